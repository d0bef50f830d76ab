"""The node shell (filled in by its own issue)."""
