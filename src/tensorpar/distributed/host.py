"""A rank's share of this host: its device, its cores and compute threads, its process name, and
a free port for a group's rendezvous. Used by every way of starting ranks (``launch``,
``SpawnedRanks``, ``launch_replicas``); reads no launcher environment."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import threading
from typing import TYPE_CHECKING

from tensorpar.errors import TensorparError

if TYPE_CHECKING:
    import torch

_PR_SET_NAME, _PR_SET_PDEATHSIG = 15, 1


def rank_device(device_type: str, local_rank: int) -> "torch.device":
    """Each rank drives its own CUDA device; CPU ranks share the host."""
    import torch

    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TensorparError(
                f"local rank {local_rank} needs its own CUDA device, but only "
                f"{torch.cuda.device_count()} are visible"
            )
        return torch.device("cuda", local_rank)
    return torch.device(device_type)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prctl(option: int, arg) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, arg, 0, 0, 0)
    except OSError:  # not Linux
        pass


def configure_rank_process(rank: int, world_size: int, threads: int | None = None, spawned: bool = True,
                           name: str | None = None) -> None:
    """Set a rank's compute threads: an equal share of the cores, each rank pinned to its own
    cores when there are at least as many cores as ranks. A spawned rank also names itself
    (``name``, by default ``tensorpar-rN``: seen in ps/top) and dies with its parent."""
    if spawned:
        _prctl(_PR_SET_NAME, (name or f"tensorpar-r{rank}").encode())
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())  # a rank's bars are its own: no semaphore left to a process that exits at once
    import torch

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    share = max(1, len(cores) // world_size)
    torch.set_num_threads(threads or share)
    if world_size <= len(cores) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cores[rank * share : (rank + 1) * share]))
