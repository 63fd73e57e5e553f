"""Errors that carry the offending config key, raised before any worker starts."""
from __future__ import annotations


class ConfigError(ValueError):
    """A job configuration that cannot run. ``key`` is the dotted config key to fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")
