"""LLM Fleet services: sync, benchmark, planner, guardian, stats, and their shared runtime."""
