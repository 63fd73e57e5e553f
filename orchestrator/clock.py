"""The command's start, the zero of every time-to-first-step figure (ours and the baselines')."""
from __future__ import annotations

import os
import time


def process_start_time() -> float:
    """When this process (the command) started, as a Unix time, to the clock tick (10 ms).

    psutil's create_time adds the process's start since boot to the boot time, which Linux
    gives in whole seconds (/proc/stat btime): it reads up to a second early, which would
    count that fraction into every time to first step. Here the start since boot is compared
    with the boot-time clock now instead."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the fields after "pid (comm)"
        started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started_after_boot)
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        import psutil

        return psutil.Process().create_time()
