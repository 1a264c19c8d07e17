"""What every fault case shares: starting a real ``tensorpar`` command and waiting for it to reach
a phase, finding its rank processes, the one error line it must end with, and the check that
nothing is left behind. (Each case's row for RELIABILITY.md: the ``record`` fixture of
``tests/conftest.py``.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import rank_processes

EXE = str(Path(sys.executable).with_name("tensorpar"))


def leftovers() -> set:
    """Shared-memory names a run could leave: tensorpar's segments and multiprocessing's semaphores."""
    shm = Path("/dev/shm")
    return set(shm.glob("tensorpar-*")) | set(shm.glob("sem.mp-*"))


def error_line(stderr: str) -> str:
    """The one ``tensorpar: error:`` line of ``stderr`` (and no traceback)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("tensorpar: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def start(*args: str, until: str | None, timeout_s: float = 120, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``tensorpar ARGS`` and return once a line of its stderr contains ``until`` (at once
    for None): (the process, that line). The rest of stderr stays unread in ``proc.stderr``."""
    proc = subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=None if env is None else {**os.environ, **env})
    if until is None:
        return proc, ""
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if until in line:
            return proc, line
        if not line and proc.poll() is not None:
            pytest.fail(f"tensorpar {args[0]} ended before {until!r}: {''.join(seen)[-2000:]}")
    proc.kill()
    pytest.fail(f"tensorpar {args[0]} never said {until!r}")


def served_port(banner: str) -> int:
    return int(re.search(r"http://[^ ]+:(\d+)", banner).group(1))


def ranks_of(proc: subprocess.Popen) -> dict:
    """``{"tensorpar-rN": psutil.Process}`` for the ranks ``proc`` spawned."""
    return {p.info["name"]: p for p in rank_processes() if p.ppid() == proc.pid}


def finish(proc: subprocess.Popen, timeout_s: float = 60) -> str:
    """Wait for ``proc`` to end (killing it if it does not); its remaining stderr."""
    try:
        _, err = proc.communicate(timeout=timeout_s)
        return err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def nothing_left(ranks: dict, before: set) -> None:
    """No rank process (zombies included) and no new shared-memory name is left."""
    time.sleep(0.5)
    alive = [p for p in ranks.values() if p.is_running() and p.status() != "zombie"]
    assert not alive, alive
    assert leftovers() <= before, leftovers() - before
