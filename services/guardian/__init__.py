"""guardian: health of every service, restarts and escalation."""
