"""Starting ranks, one way for every command: ``launch`` joins the group ``torchrun`` set up, stays
in this process for one rank, or spawns N local processes.

Each rank runs one *worker*, ``factory(ctx, *args)``; ``Ranks.call(method, ...)`` runs
``worker.method(...)`` on every rank and returns rank 0's result. Under torchrun the user's
program runs on every rank, so ``call`` runs the method here and every rank makes the same calls.

This is the only module that reads the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``; ``MASTER_ADDR``/``MASTER_PORT`` are read by ``env://``). Spawned ranks are
supervised: if any rank dies or raises, the others are stopped and the caller gets one
``RankFailure`` naming the rank that failed first and why.
"""

from __future__ import annotations

import collections
import ctypes
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any, Callable

from tensorpar.distributed import DEFAULT_TIMEOUT_S
from tensorpar.errors import RankFailure, TensorparError

if TYPE_CHECKING:
    import torch

    from tensorpar.distributed.groups import ParallelContext

Factory = Callable[..., Any] | str  # a worker factory, or its "module:name" (imported by the ranks themselves)


BUILD = "__build__"  # the call that replaces a rank's worker by factory(ctx, *args)


def _factory(factory: Factory | None) -> Callable[..., Any] | None:
    if isinstance(factory, str):
        module, _, name = factory.partition(":")
        return getattr(import_module(module), name)
    return factory

_PR_SET_NAME, _PR_SET_PDEATHSIG = 15, 1


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int = 1


def torchrun_env() -> TorchrunEnv | None:
    """The rank layout ``torchrun`` exported, or None when not launched by it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    return TorchrunEnv(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


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


def join_torchrun(
    env: TorchrunEnv, device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S, use_shm: bool = True,
    group_size: int | None = None,
) -> "ParallelContext":
    """Join this rank's group: torchrun's whole world, or (``group_size`` smaller than it) the
    ``group_size`` adjacent ranks of this one, as a process group of their own on torchrun's store."""
    from tensorpar.distributed.groups import init_group

    device = rank_device(device_type, env.local_rank)
    if not group_size or group_size == env.world_size:
        return init_group(env.rank, env.world_size, "env://", device, timeout_s, use_shm)
    import torch.distributed as dist

    store = dist.PrefixStore(f"tensorpar/group{env.rank // group_size}/", torchrun_store(env, timeout_s))
    return init_group(env.rank % group_size, group_size, None, device, timeout_s, use_shm, store=store)


def torchrun_store(env: TorchrunEnv, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A client of the key-value store torchrun's ranks share (``MASTER_ADDR:MASTER_PORT``): the
    agent's store, or, when torchrun does not host one, the one rank 0 hosts."""
    import datetime

    import torch.distributed as dist

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=env.rank == 0 and not agent_store, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


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
        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())  # a rank's bars are its own: no semaphore left to a process that exits at once
    import torch

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    share = max(1, len(cores) // world_size)
    torch.set_num_threads(threads or share)
    if world_size <= len(cores) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cores[rank * share : (rank + 1) * share]))


def _build(factory: Factory | None, ctx, args: tuple, old=None):
    """A new worker for ``ctx`` (None without a factory); the old one is closed first."""
    if old is not None and hasattr(old, "close"):
        old.close()
    factory = _factory(factory)
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
        factory, args = conn.recv()
        from tensorpar.distributed.groups import init_group

        _factory(factory)
        started["import_s"] = time.perf_counter() - t  # torch and the worker's code
        device = rank_device(device_type, rank)
        t = time.perf_counter()
        ctx = init_group(rank, world_size, f"tcp://127.0.0.1:{port}", device, timeout_s, use_shm)
        started["group_s"] = time.perf_counter() - t
        worker = _build(factory, ctx, args)
        conn.send(("ready", rank, {**started, **getattr(worker, "info", {})}))
        while (msg := conn.recv()) is not None:
            method, a, kw = msg
            try:
                if method == BUILD:
                    worker = _build(a[0], ctx, a[1], worker)
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


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


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
        mpc = mp.get_context("spawn")
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
        return RankFailure(self.first + i, self.world_size, _describe_exit(code))

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
            raise RankFailure(rank, self.world_size, _describe_exit(self._procs[rank - self.first].exitcode))
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
        self.local = _build(factory, self.ctx, args, self.local)
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


def launch(
    world_size: int,
    factory: Factory | None = None,
    args: tuple = (),
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    use_shm: bool = True,
    leader_here: bool = False,
    replicas: int = 1,
    cores: tuple[int, int | None] = (0, None),
) -> Ranks:
    """Bring up ``world_size`` ranks, each running ``factory(ctx, *args)`` (or no worker yet, for
    ``rebuild`` to give them one: ranks kept for one model after another).

    Under torchrun this process joins its group (``world_size`` must be torchrun's; the caller
    has checked) and builds its own worker. One rank runs in this process. Otherwise the ranks
    are spawned; with ``leader_here`` this process is rank 0 (its worker is ``ranks.local``) and
    only ranks 1..N-1 are spawned, building their workers while this one builds its own.

    ``replicas``: under torchrun, its world holds that many independent groups of ``world_size``
    ranks (data-parallel replicas; replica ``d`` is ranks ``d * world_size ...``), and this process
    joins its replica's group (``ranks.replica`` says which); elsewhere it is ignored (each replica
    on this host is launched by its own leader). ``cores``: see ``SpawnedRanks``.
    """
    device_type = device.split(":")[0]
    env = torchrun_env()
    if env is not None:
        from tensorpar.distributed import groups  # (torch: imported by the processes that are ranks, once they are)

        if env.world_size != world_size * replicas:
            raise TensorparError(f"{world_size * replicas} ranks were asked for, but torchrun started {env.world_size}")
        ctx = join_torchrun(env, device_type, timeout_s, use_shm, world_size)
        try:
            return InProcessRanks(_build(factory, ctx, args), ctx, owns_group=True, replica=env.rank // world_size)
        except BaseException:
            groups.destroy_group(ctx)
            raise
    if world_size == 1:
        from tensorpar.distributed import groups

        if cores[1]:  # one of several single-rank groups on this host
            configure_rank_process(cores[0], cores[1], spawned=False)
        ctx = groups.single_process_context(device)
        return InProcessRanks(_build(factory, ctx, args), ctx, owns_group=False)
    if device_type == "cuda":
        import torch

        if torch.cuda.device_count() < world_size:
            raise TensorparError(f"{world_size} ranks on CUDA need {world_size} GPUs; "
                                 f"{torch.cuda.device_count()} visible")
    ranks = SpawnedRanks(world_size, factory, args, device_type, timeout_s, use_shm, leader_here=leader_here,
                         cores=cores)
    if not leader_here:
        return ranks
    try:
        from tensorpar.distributed import groups

        configure_rank_process(cores[0], cores[1] or world_size, spawned=False)
        ranks.ctx = groups.init_group(0, world_size, ranks.init_method, rank_device(device_type, 0), timeout_s, use_shm)
        ranks.local = _build(factory, ranks.ctx, args)
        ranks.wait_ready()
    except BaseException:
        failure = ranks.failure()
        ranks.close(force=True)
        if failure is not None:
            raise failure from None
        raise
    return ranks
