"""Process memory, as tensorpar reports it."""

from __future__ import annotations

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
