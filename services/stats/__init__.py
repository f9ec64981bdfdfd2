"""stats: each model's work record per user and session."""
