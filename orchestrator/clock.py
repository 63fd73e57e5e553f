"""The command's start, the zero of every time-to-first-step figure (ours and the baselines')."""
from __future__ import annotations

import os
import sys
import time


# A process that started this much earlier than its Python's first import of ``launch`` was a
# shell first (``bash -c "pip install ... && python -m launch.train"`` execs Python into the
# shell's process): the command then counts from that import. Python's own start up to it takes
# about 0.05 s here.
EXEC_GAP_S = 1.0


def process_start_time() -> float:
    """When this command's Python started, as a Unix time: the process's start (to the clock tick,
    10 ms), unless the process ran something else before it exec'd Python (see EXEC_GAP_S)."""
    started = _process_start()
    launch = sys.modules.get("launch")
    first_import = getattr(launch, "STARTED", None)
    if first_import is not None and first_import - started > EXEC_GAP_S:
        return first_import
    return started


def _process_start() -> float:
    """When this process started, as a Unix time, to the clock tick (10 ms).

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
