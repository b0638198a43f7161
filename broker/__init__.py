"""The pto broker: routes ready tasks from clients to one worker per chip (python -m broker)."""
