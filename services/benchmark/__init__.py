"""benchmark: benchmark runs with a price guard and streaming measurements."""
