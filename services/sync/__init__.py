"""sync: the model catalog (OpenRouter and local Ollama devices)."""
