"""The client shell (filled in by its own issue)."""
