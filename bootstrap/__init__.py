"""The bootstrap shell (filled in by its own issue)."""
