"""Starting ranks: spawn N local processes, or join the group ``torchrun`` set up.

This is the only module that reads the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``; ``MASTER_ADDR``/``MASTER_PORT`` are read by ``env://``). Spawned ranks are
supervised: if any rank dies or raises, the others are stopped and the caller gets one
``RankFailure`` naming the rank that failed first and why.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import resource
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tensorpar.distributed.groups import DEFAULT_TIMEOUT_S, ParallelContext, destroy_group, init_group
from tensorpar.errors import RankFailure, TensorparError

_PR_SET_NAME, _PR_SET_PDEATHSIG = 15, 1


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int


def torchrun_env() -> TorchrunEnv | None:
    """The rank layout ``torchrun`` exported, or None when not launched by it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    return TorchrunEnv(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def rank_device(device_type: str, local_rank: int) -> torch.device:
    """Each rank drives its own CUDA device; CPU ranks share the host."""
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TensorparError(
                f"local rank {local_rank} needs its own CUDA device, but only "
                f"{torch.cuda.device_count()} are visible"
            )
        return torch.device("cuda", local_rank)
    return torch.device(device_type)


def join_torchrun(
    env: TorchrunEnv, device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S, use_shm: bool = True
) -> ParallelContext:
    device = rank_device(device_type, env.local_rank)
    return init_group(env.rank, env.world_size, "env://", device, timeout_s, use_shm)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prctl(option: int, arg) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, arg, 0, 0, 0)
    except OSError:  # not Linux
        pass


def configure_rank_process(rank: int, world_size: int, threads: int | None = None, spawned: bool = True) -> None:
    """Set a rank's compute threads: an equal share of the cores, each rank pinned to its own
    cores when there are at least as many cores as ranks. A spawned rank also names itself
    ``tensorpar-rN`` (seen in ps/top) and dies with its parent."""
    if spawned:
        _prctl(_PR_SET_NAME, f"tensorpar-r{rank}".encode())
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    share = max(1, len(cores) // world_size)
    torch.set_num_threads(threads or share)
    if world_size <= len(cores) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cores[rank * share : (rank + 1) * share]))


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


def _rank_main(rank, world_size, port, device_type, timeout_s, use_shm, factory, args, inbox, outbox):
    """Body of a spawned rank: join the group, build the worker, serve calls until told to stop."""
    ctx = None
    try:
        configure_rank_process(rank, world_size)
        device = rank_device(device_type, rank)
        ctx = init_group(rank, world_size, f"tcp://127.0.0.1:{port}", device, timeout_s, use_shm)
        worker = factory(ctx, *args)
        outbox.put(("ready", rank, None))
        while (msg := inbox.get()) is not None:
            method, a, kw = msg
            try:
                result = getattr(worker, method)(*a, **kw)
            except (TensorparError, ValueError) as e:  # the caller's mistake, raised alike on every rank
                result = e
            if rank == 0:
                outbox.put(("result", rank, result))
    except BaseException as e:  # noqa: BLE001 - report everything, then die
        brief = "".join(traceback.format_exception_only(type(e), e)).strip()
        outbox.put(("error", rank, (time.time(), brief, traceback.format_exc())))
        outbox.close()
        outbox.join_thread()
        os._exit(1)
    finally:
        if ctx is not None:
            destroy_group(ctx)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class SpawnedRanks:
    """N local rank processes on 127.0.0.1, each running ``factory(ctx, *args)``.

    ``call(method, ...)`` runs ``worker.method(...)`` on every rank and returns rank 0's result.
    Any rank that dies or raises brings all of them down with a ``RankFailure``.
    """

    GRACE_S = 1.0

    def __init__(
        self,
        world_size: int,
        factory: Callable[..., Any],
        args: tuple = (),
        device_type: str = "cpu",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        use_shm: bool = True,
        leader_here: bool = False,
    ):
        """With ``leader_here`` only ranks 1..N-1 are spawned: the caller joins as rank 0 at
        ``init_method`` (see ``join_as_leader``) and then calls ``wait_ready``."""
        self.world_size = world_size
        self.first = 1 if leader_here else 0
        mpc = mp.get_context("spawn")
        self._outbox = mpc.Queue()
        self._inboxes = [mpc.Queue() for _ in range(world_size - self.first)]
        self.port = free_port()
        self.init_method = f"tcp://127.0.0.1:{self.port}"
        self._procs = [
            mpc.Process(
                target=_rank_main,
                args=(r, world_size, self.port, device_type, timeout_s, use_shm, factory, args,
                      self._inboxes[r - self.first], self._outbox),
                name=f"tensorpar-r{r}",
                daemon=True,
            )
            for r in range(self.first, world_size)
        ]
        for p in self._procs:
            p.start()
        self._closed = False
        if not leader_here:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every spawned rank has built its worker."""
        ready = set()
        while len(ready) < len(self._procs):
            kind, rank, _ = self._next_message()
            if kind == "ready":
                ready.add(rank)

    def start(self, method: str, *args, **kwargs) -> None:
        """Have every spawned rank run ``worker.method(...)`` without waiting for a result."""
        for box in self._inboxes:
            box.put((method, args, kwargs))

    def failure(self) -> RankFailure | None:
        """A RankFailure for the first spawned rank found dead, or None while all are alive."""
        for i, p in enumerate(self._procs):
            if p.exitcode is not None:
                return RankFailure(self.first + i, self.world_size, _describe_exit(p.exitcode))
        return None

    @property
    def pids(self) -> list[int]:
        """Process ids of the spawned ranks, in rank order."""
        return [p.pid for p in self._procs]

    def call(self, method: str, *args, **kwargs):
        if self._closed:
            raise TensorparError("the tensor-parallel ranks have been shut down")
        for box in self._inboxes:
            box.put((method, args, kwargs))
        while True:
            kind, _, payload = self._next_message()
            if kind == "result":
                if isinstance(payload, BaseException):
                    raise payload
                return payload

    def _next_message(self):
        """The next message from a rank; raises RankFailure as soon as any rank fails."""
        while True:
            try:
                msg = self._outbox.get(timeout=0.05)
            except queue.Empty:
                msg = None
            if msg is not None and msg[0] != "error":
                return msg
            dead = [p for p in self._procs if p.exitcode is not None]
            if msg is not None or dead:
                self._fail(msg)

    def _fail(self, first):
        """Collect what every rank says for a moment, stop them all, and name the root cause:
        a rank that died without a word (killed) first, else the earliest error."""
        errors = {}
        if first is not None:
            errors[first[1]] = first[2]
        deadline = time.monotonic() + self.GRACE_S
        while time.monotonic() < deadline:
            try:
                kind, rank, payload = self._outbox.get(timeout=0.05)
                if kind == "error":
                    errors[rank] = payload
            except queue.Empty:
                if all(p.exitcode is not None for p in self._procs):
                    break
        silent = [self.first + i for i, p in enumerate(self._procs)
                  if p.exitcode is not None and self.first + i not in errors]
        self.close(force=True)
        if silent:
            rank = silent[0]
            raise RankFailure(rank, self.world_size, _describe_exit(self._procs[rank - self.first].exitcode))
        rank = min(errors, key=lambda r: errors[r][0])
        failure = RankFailure(rank, self.world_size, errors[rank][1])
        failure.remote_traceback = errors[rank][2]
        raise failure

    def close(self, force: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if not force:
            for box in self._inboxes:
                box.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
