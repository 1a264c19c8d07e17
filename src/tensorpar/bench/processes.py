"""Child processes with a timeout: past it the child and everything it started are killed."""

from __future__ import annotations

import os
import subprocess


def _kill_tree(pid: int) -> None:
    """Kill ``pid`` and every process below it. torchrun starts its workers in sessions of their
    own, so killing torchrun's process group alone would leave them running."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def run_with_timeout(cmd: list[str], timeout_s: float) -> tuple[int | None, str, str]:
    """Run ``cmd``; past ``timeout_s`` kill it and everything it started.
    Returns (exit code, or None on timeout; stdout; stderr)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout_s)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        _kill_tree(p.pid)
        out, err = p.communicate()
        return None, out, err
