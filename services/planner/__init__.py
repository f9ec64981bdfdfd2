"""planner: execution plans of subtasks with dependencies."""
