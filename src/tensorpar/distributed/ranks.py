"""The ranks ``launch`` brings up, behind one ``Ranks`` union: ``SpawnedRanks`` (local rank
processes, supervised) and ``InProcessRanks`` (this process is the only rank, or one of torchrun's).

Each rank runs one *worker*, ``factory(ctx, *args)``; ``Ranks.call(method, ...)`` runs
``worker.method(...)`` on every rank and returns rank 0's result.

A spawned rank and its parent talk over one pipe:

- parent to rank: first ``(factory, args)``; then calls ``(method, args, kwargs)`` (``method``
  ``BUILD``, with ``args`` ``(factory, args)``: a new worker on the same group); ``None``: stop.
- rank to parent: ``("ready", rank, info)`` once its worker is built (``info``: start-up seconds
  and the worker's ``info``); ``("result", rank, value)`` after each call, from rank 0 only
  (``value`` is the exception for a caller's mistake, ``TensorparError`` or ``ValueError``, raised
  alike on every rank); ``("error", rank, (time, brief, traceback))`` before it exits on any
  other exception.

If any rank dies or raises, the others are stopped and the caller gets one ``RankFailure`` naming
the rank that failed first and why.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable

from tensorpar.distributed import DEFAULT_TIMEOUT_S
from tensorpar.distributed.host import configure_rank_process, free_port, rank_device
from tensorpar.errors import RankFailure, TensorparError

if TYPE_CHECKING:
    from tensorpar.distributed.groups import ParallelContext

Factory = Callable[..., Any]  # a module-level class or function, ``factory(ctx, *args)``: see ``launch``

BUILD = "__build__"  # the call that replaces a rank's worker by factory(ctx, *args)


def build_worker(factory: Factory | None, ctx, args: tuple, old=None):
    """A new worker for ``ctx`` (None without a factory); the old one is closed first."""
    if old is not None and hasattr(old, "close"):
        old.close()
    return None if factory is None else factory(ctx, *args)


def _rank_main(rank, world_size, port, device_type, timeout_s, use_shm, conn, spawned_at, cores):
    """Body of a spawned rank: take its worker's factory and arguments (the first message on
    ``conn``, its pipe to the parent: a spawned process's own arguments must stay small, or a
    process that dies before reading them leaves its parent blocked), join the group, build the
    worker, serve calls (``BUILD``: a new worker on the same group) until told to stop."""
    ctx = None
    started = {"process_s": time.time() - spawned_at}  # the interpreter's start
    try:
        t = time.perf_counter()
        configure_rank_process(cores[0] + rank, cores[1] or world_size)
        factory, args = conn.recv()  # (unpickling the factory imports its module)
        from tensorpar.distributed.groups import init_group

        started["import_s"] = time.perf_counter() - t  # torch and the worker's code
        device = rank_device(device_type, rank)
        t = time.perf_counter()
        ctx = init_group(rank, world_size, f"tcp://127.0.0.1:{port}", device, timeout_s, use_shm)
        started["group_s"] = time.perf_counter() - t
        worker = build_worker(factory, ctx, args)
        conn.send(("ready", rank, {**started, **getattr(worker, "info", {})}))
        while (msg := conn.recv()) is not None:
            method, a, kw = msg
            try:
                if method == BUILD:
                    worker = build_worker(a[0], ctx, a[1], worker)
                    result = getattr(worker, "info", {})
                else:
                    result = getattr(worker, method)(*a, **kw)
            except (TensorparError, ValueError) as e:  # the caller's mistake, raised alike on every rank
                result = e
            if rank == 0:
                conn.send(("result", rank, result))
        _close_local(worker, ctx)
        code = 0
    except BaseException as e:  # noqa: BLE001 - report everything, then die
        brief = str(e) if isinstance(e, TensorparError) else "".join(traceback.format_exception_only(type(e), e)).strip()
        try:
            conn.send(("error", rank, (time.time(), brief, traceback.format_exc())))
        except OSError:  # the parent is gone
            pass
        code = 1
    conn.close()
    os._exit(code)  # nothing is left to tear down: skip the interpreter's (slow) module finalization


def describe_exit(code: int) -> str:
    """A process's exit code in words: "exited with code 1", "killed by signal SIGKILL"."""
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


_start_method = "spawn"  # how ``SpawnedRanks`` starts rank processes (``fork_ranks_from_server``)


def fork_ranks_from_server(modules: tuple[str, ...]) -> None:
    """From now on, start this process's spawned ranks by forking a server process that imported
    torch and ``modules`` once, now, in the background: a rank then starts in milliseconds instead
    of a fresh interpreter's import (about 2 s on 2 cores). For a process that will spawn ranks
    later and must do it fast (a standby replica leader, ``distributed.replicas.ReplicaStarter``).
    The server dies with this process; so do the ranks it forks, as spawned ones do."""
    global _start_method
    from multiprocessing import forkserver

    mp.get_context("forkserver").set_forkserver_preload(["torch", *modules])
    forkserver.ensure_running()
    _start_method = "forkserver"


class SpawnedRanks:
    """N local rank processes on 127.0.0.1, each running ``factory(ctx, *args)``.

    ``call(method, ...)`` runs ``worker.method(...)`` on every rank and returns rank 0's result;
    ``rebuild`` gives every rank a new worker on the same group. Any rank that dies or raises
    brings all of them down with a ``RankFailure``.
    """

    GRACE_S = 1.0

    def __init__(
        self,
        world_size: int,
        factory: Factory,
        args: tuple = (),
        device_type: str = "cpu",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        use_shm: bool = True,
        leader_here: bool = False,
        cores: tuple[int, int | None] = (0, None),
    ):
        """With ``leader_here`` only ranks 1..N-1 are spawned: the caller joins as rank 0 at
        ``init_method`` and then calls ``wait_ready`` (``launch(..., leader_here=True)`` does both).
        ``cores``: (this group's first rank, ranks on this host) when several groups share the host,
        so that each rank gets cores of its own (``configure_rank_process``)."""
        if getattr(mp.current_process(), "_inheriting", False):  # a rank being spawned re-ran the caller's script
            print("tensorpar: error: a rank process re-ran the top level of your script, which starts ranks again: "
                  "guard it with `if __name__ == \"__main__\":`", file=sys.stderr, flush=True)
            os._exit(1)
        self.world_size = world_size
        self.first = 1 if leader_here else 0
        mpc = mp.get_context(_start_method)
        # one pipe per spawned rank (a Queue would leave semaphores to the resource tracker)
        pipes = [mpc.Pipe() for _ in range(world_size - self.first)]
        self._conns = [mine for mine, _ in pipes]
        self._open = list(self._conns)  # those a rank may still write to
        self._received: collections.deque = collections.deque()  # read, not yet handled
        self.port = free_port()
        self.init_method = f"tcp://127.0.0.1:{self.port}"
        self.local = None  # rank 0's worker, when it runs in this process
        self.ctx: ParallelContext | None = None
        self.ready_info: dict[int, dict] = {}  # what each spawned rank said when its worker was built
        spawned_at = time.time()
        self._procs = [
            mpc.Process(
                target=_rank_main,
                args=(r, world_size, self.port, device_type, timeout_s, use_shm, pipes[r - self.first][1],
                      spawned_at, cores),
                name=f"tensorpar-r{r}",
                daemon=True,
            )
            for r in range(self.first, world_size)
        ]
        for p, (conn, theirs) in zip(self._procs, pipes):
            p.start()
            theirs.close()  # only the rank holds its end: a rank's death is an end of file here
            self._send(conn, (factory, args))
        self._closed = False
        if not leader_here:
            self.wait_ready()

    is_leader = True  # this process is rank 0 (``leader_here``) or drives them all: it speaks for rank 0
    replica = 0  # spawned ranks are one group (several replicas on one host are launched one by one)

    def wait_ready(self) -> None:
        """Block until every spawned rank has built its worker."""
        while len(self.ready_info) < len(self._procs):
            kind, rank, info = self._next_message()
            if kind == "ready":
                self.ready_info[rank] = info or {}

    @staticmethod
    def _send(conn, msg) -> None:
        """Send to one rank; a rank that has died is noticed by its exit code, not here."""
        try:
            conn.send(msg)
        except OSError:
            pass

    def start(self, method: str, *args, **kwargs) -> None:
        """Have every spawned rank run ``worker.method(...)`` without waiting for a result."""
        for conn in self._conns:
            self._send(conn, (method, args, kwargs))

    def failure(self) -> RankFailure | None:
        """A RankFailure for a spawned rank found dead, or None while all are alive: one killed by
        a signal first (the others of its group then fail in their collectives and exit), else
        the lowest."""
        dead = [(i, p.exitcode) for i, p in enumerate(self._procs) if p.exitcode is not None]
        if not dead:
            return None
        i, code = min(dead, key=lambda d: (d[1] >= 0, d[0]))
        return RankFailure(self.first + i, self.world_size, describe_exit(code))

    @property
    def pids(self) -> list[int]:
        """Process ids of the spawned ranks, in rank order."""
        return [p.pid for p in self._procs]

    def rebuild(self, factory: Factory | None, args: tuple = ()) -> dict:
        """Replace every rank's worker by ``factory(ctx, *args)`` on the same group (None: no worker)."""
        if self.first:
            raise TensorparError("ranks whose leader runs in this process keep their workers")
        self.ready_info[0] = info = self.call(BUILD, factory, args)
        return info

    def call(self, method: str, *args, **kwargs):
        if self._closed:
            raise TensorparError("the tensor-parallel ranks have been shut down")
        for conn in self._conns:
            self._send(conn, (method, args, kwargs))
        while True:
            kind, _, payload = self._next_message()
            if kind == "result":
                if isinstance(payload, RankFailure):  # a peer fell silent: the group cannot go on
                    self.close(force=True)
                if isinstance(payload, BaseException):
                    raise payload
                return payload

    def _receive(self, timeout_s: float) -> None:
        """Queue what the ranks have sent, waiting up to ``timeout_s`` for anything (a pipe at its
        end is dropped: its rank has exited)."""
        from multiprocessing.connection import wait

        for conn in wait(self._open, timeout=timeout_s):
            try:
                self._received.append(conn.recv())
            except (EOFError, OSError):
                self._open.remove(conn)

    def _next_message(self):
        """The next message from a rank; raises RankFailure as soon as any rank fails."""
        while True:
            if not self._received:
                self._receive(0.05)
            if self._received:
                msg = self._received.popleft()
                if msg[0] != "error":
                    return msg
                self._fail(msg)
            elif any(p.exitcode is not None for p in self._procs):
                self._fail(None)

    def _fail(self, first):
        """Collect what every rank says for a moment, stop them all, and name the root cause:
        a rank that died without a word (killed) first, else the earliest error."""
        errors = {}
        if first is not None:
            errors[first[1]] = first[2]
        deadline = time.monotonic() + self.GRACE_S
        while time.monotonic() < deadline:
            if self._open:
                self._receive(0.05)
            else:
                time.sleep(0.01)
            while self._received:
                kind, rank, payload = self._received.popleft()
                if kind == "error":
                    errors[rank] = payload
            if not self._open and all(p.exitcode is not None for p in self._procs):
                break  # (a killed rank's pipe ends a moment before the kernel has it as exited)
        silent = [self.first + i for i, p in enumerate(self._procs)
                  if p.exitcode is not None and self.first + i not in errors]
        self.close(force=True)
        if silent:
            rank = silent[0]
            raise RankFailure(rank, self.world_size, describe_exit(self._procs[rank - self.first].exitcode))
        rank = min(errors, key=lambda r: errors[r][0])
        failure = RankFailure(rank, self.world_size, errors[rank][1])
        failure.remote_traceback = errors[rank][2]
        raise failure

    def close(self, force: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        _close_local(self.local, self.ctx)
        if not force:
            for conn in self._conns:
                self._send(conn, None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():  # forced: the group is broken, and a stopped rank would ignore SIGTERM
                p.kill() if force else p.terminate()
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self._conns:
            conn.close()


def _close_local(worker, ctx: "ParallelContext | None") -> None:
    if worker is not None and hasattr(worker, "close"):
        worker.close()
    if ctx is not None:
        from tensorpar.distributed.groups import destroy_group

        destroy_group(ctx)


class InProcessRanks:
    """This process is the only rank, or one of torchrun's: ``call`` runs the method on the worker
    here (under torchrun every rank's program makes the same calls)."""

    def __init__(self, worker, ctx: "ParallelContext", owns_group: bool, replica: int = 0):
        self.local, self.ctx, self._owns_group, self.replica = worker, ctx, owns_group, replica
        self.world_size = ctx.world_size
        self.ready_info = {0: getattr(worker, "info", {})} if ctx.is_leader else {}
        self.pids: list[int] = []
        self._closed = False

    @property
    def is_leader(self) -> bool:
        return self.ctx.is_leader

    def call(self, method: str, *args, **kwargs):
        if self._closed:
            raise TensorparError("the ranks have been shut down")
        return getattr(self.local, method)(*args, **kwargs)

    def rebuild(self, factory: Factory | None, args: tuple = ()) -> dict:
        self.local = build_worker(factory, self.ctx, args, self.local)
        info = getattr(self.local, "info", {})
        if self.ctx.is_leader:
            self.ready_info[0] = info
        return info

    def start(self, method: str, *args, **kwargs) -> None:
        """Nothing to start: no other rank runs in a process of ours."""

    def wait_ready(self) -> None:
        pass

    def failure(self) -> RankFailure | None:
        return None

    def close(self, force: bool = False) -> None:
        if not self._closed:
            self._closed = True
            _close_local(self.local, self.ctx if self._owns_group else None)


Ranks = SpawnedRanks | InProcessRanks
