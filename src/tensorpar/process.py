"""What tensorpar reports about its own process: peak memory and age."""

from __future__ import annotations

import os
import resource


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    Linux's VmHWM, which starts afresh at ``exec``; ``ru_maxrss`` would carry over the peak of the
    process that spawned this one.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def age_s() -> float | None:
    """Seconds since this process started (None where /proc does not say)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def release_freed_memory() -> None:
    """Return the heap's freed pages to the system (glibc's ``malloc_trim``; elsewhere nothing), so
    that many freed temporaries do not stay counted in the process's resident memory."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
