"""Errors that carry the offending config key, raised before any worker starts."""
from __future__ import annotations


class ConfigError(ValueError):
    """A job configuration that cannot run. ``key`` is the dotted config key to fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


# After a stop signal the driver tears the job down; should that hang, launch.train leaves after
# this long, and a submitted job's Ray supervisor waits as long before its SIGKILL.
STOP_GRACE_S = 60


class Stopped(KeyboardInterrupt):
    """The driver was told to stop (SIGINT: Ctrl-C; SIGTERM: launch.stop, Ray Jobs, a scheduler).
    Raised from the signal handler, handled like Ctrl-C: teardown, then the job ends "stopped".
    The signal's name is also kept process-wide (``stop_signal``): a library that catches the
    interrupt may raise a plain KeyboardInterrupt in its place (Ray's blocking calls do)."""

    last_signal: str | None = None

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
        Stopped.last_signal = signal_name


def stop_signal(exc: BaseException) -> str:
    """The name of the signal that stopped the driver (SIGINT where none was recorded)."""
    return getattr(exc, "signal_name", None) or Stopped.last_signal or "SIGINT"
