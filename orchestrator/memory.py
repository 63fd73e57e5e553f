"""Resident memory of this process: now, its peak, and the peak over a window.

The peak over a window uses Linux's reset of the high-water mark (writing 5 to
/proc/self/clear_refs); the process's lifetime peak is kept here across resets. Elsewhere the
window's peak is the lifetime peak (an upper bound).
"""
from __future__ import annotations

import resource

_lifetime_peak = 0


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_bytes()


def peak_bytes() -> int:
    """The peak since the last ``reset_peak`` (or since the start)."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    """Starts a new window for ``peak_bytes``."""
    global _lifetime_peak
    _lifetime_peak = max(_lifetime_peak, peak_bytes())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def lifetime_peak_bytes() -> int:
    return max(_lifetime_peak, peak_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
