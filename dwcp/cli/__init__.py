"""Command-line tools (click); no logic the library does not expose."""
