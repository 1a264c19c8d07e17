"""Data-parallel replicas: ``dp`` independent groups of ``replica_size`` ranks, each led by a
process of its own (a process belongs to one process group), and a connection from replica 0's
leader to each other leader.

Where they run. On one host replica 0's leader is the process that calls ``launch_replicas``; it
spawns the leaders of replicas 1..dp-1 (``tensorpar-dp<d>``), and each leader launches its own
ranks, on cores of their own. Under torchrun replica ``d`` is ranks ``d * replica_size ...`` and
its leader is the first of them.

What runs in them is the caller's ``ReplicaRole`` (this floor knows no engine): ``start`` builds a
replica's engine on its leader, ``serve`` runs a leader other than replica 0's, ``follow`` runs a
torchrun rank that leads nothing, ``stop`` takes replica 0's engine down when another replica
failed to start.

The handshake, from the leader of replica d (1..dp-1) to replica 0's leader, over a
``multiprocessing.connection`` socket with an authentication key:

1. connect and send ``d``;
2. launch the replica's ranks and ``start`` its engine, then send ``("ready", None)``, or
   ``("failed", "<one line>")`` and exit;
3. from then on the connection is the role's (``serve`` on this side, the caller's proxy on
   replica 0's).

``ReplicaStarter`` starts leaders from a process that leads no replica (a server's front end
without weights): the same leader body, told its plan and index over its connection once needed,
and one such leader kept waiting ahead of need, warm.

Under torchrun replica 0's leader listens on the interface that reaches torchrun's store and
publishes where, as JSON ``{"host", "port", "authkey"}`` under ``ROUTER_KEY`` in that store.
Replica 0's leader waits up to ``STARTUP_S`` for every replica to be ready; one that fails,
exits or is late fails the whole start, with one message naming it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import json
import multiprocessing as mp
import os
import secrets
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from typing import TYPE_CHECKING, Any, Protocol

from tensorpar.distributed import DEFAULT_TIMEOUT_S
from tensorpar.distributed.host import configure_rank_process
from tensorpar.distributed.launch import TorchrunEnv, launch, torchrun_env, torchrun_host_address, torchrun_store
from tensorpar.distributed.ranks import Factory, Ranks, describe_exit, fork_ranks_from_server
from tensorpar.errors import TensorparError, one_line

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from tensorpar.distributed.dims import ParallelDims

STARTUP_S = 900.0  # how long replica 0's leader waits for the others to load their models
ROUTER_KEY = "tensorpar/router"  # where, in torchrun's store, replica 0's leader says where to connect


class ReplicaRole(Protocol):
    """What runs in each replica once its ranks are up, supplied by the layer above. Spawned
    leaders receive it pickled: an instance of a module-level class."""

    def start(self, ranks: Ranks) -> Any:
        """The replica's engine on its ranks, on its leader; raising fails the replica's start."""

    def serve(self, engine: Any, conn: Connection) -> bool:
        """Run a leader other than replica 0's over ``conn`` until either side ends it; whether its
        engine ended healthy."""

    def follow(self, ranks: Ranks) -> None:
        """Run a torchrun rank that is not its replica's leader until its leader stops."""

    def stop(self, engine: Any) -> None:
        """Take replica 0's engine down (another replica failed to start)."""


@dataclasses.dataclass(frozen=True)
class ReplicaLeader:
    """The leader of replica ``index`` as replica 0's leader sees it, once it has said "ready"."""

    index: int
    conn: Connection  # the handshake is done: what follows is the role's protocol
    process: BaseProcess | None  # spawned by this process; None under torchrun


@dataclasses.dataclass
class LaunchedReplicas:
    """What replica 0's leader gets from ``launch_replicas``."""

    ranks: Ranks  # replica 0's ranks; this process is their rank 0
    engine: Any  # ``role.start(ranks)``
    leaders: list[ReplicaLeader]  # replicas 1..dp-1, in order, each ready


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How every replica launches (pickled to the spawned leaders)."""

    dims: ParallelDims
    factory: Factory
    args: tuple
    role: ReplicaRole
    device: str
    timeout_s: float
    use_shm: bool

    def launch(self, index: int) -> Ranks:
        """Replica ``index``'s ranks, this process their rank 0 (under torchrun: this rank's replica)."""
        dims = self.dims
        cores = (index * dims.replica_size, dims.world_size) if dims.dp > 1 else (0, None)
        return launch(dims.replica_size, self.factory, self.args, self.device, self.timeout_s, self.use_shm,
                      leader_here=True, replicas=dims.dp, cores=cores,
                      step_thread=getattr(self.role, "steps_on_thread", False))


def launch_replicas(
    dims: ParallelDims,
    factory: Factory,
    args: tuple,
    role: ReplicaRole,
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    use_shm: bool = True,
    spawned_args: tuple | None = None,
) -> LaunchedReplicas | None:
    """Bring up ``dims.dp`` replicas of ``dims.replica_size`` ranks, each rank running
    ``factory(ctx, *args)`` (the form ``launch`` takes), and ``role`` in each replica.

    Returns, in replica 0's leader, its ranks, its engine and the other leaders, each ready. Every
    other process returns None once its part has ended: a torchrun rank that leads nothing after
    ``role.follow``, the leader of another torchrun replica after ``role.serve``. (Spawned leaders
    never return: their process exits.) ``spawned_args``: the factory's arguments in spawned
    leaders' replicas, when not ``args``. Raises ``TensorparError`` naming the first replica that
    failed to start, after stopping the others on this host.
    """
    plan = _Plan(dims, factory, args, role, device, timeout_s, use_shm)
    env = torchrun_env()
    if env is not None:
        return _torchrun_replicas(plan, env)
    if dims.dp == 1:
        ranks = plan.launch(0)
        return LaunchedReplicas(ranks, role.start(ranks), [])
    authkey = secrets.token_bytes(32)
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    theirs = plan if spawned_args is None else dataclasses.replace(plan, args=spawned_args)
    mpc = mp.get_context("spawn")
    procs = [mpc.Process(target=_leader_main, args=(listener.address, authkey, (), theirs, i),
                         name=f"tensorpar-dp{i}", daemon=False) for i in range(1, dims.dp)]
    for p in procs:
        p.start()
    try:
        ranks = plan.launch(0)
    except BaseException:
        listener.close()
        _kill(procs)
        raise
    return _gather(role, ranks, listener, dict(enumerate(procs, 1)), dims.dp)


def _torchrun_replicas(plan: _Plan, env: TorchrunEnv) -> LaunchedReplicas | None:
    ranks = plan.launch(0)
    if not ranks.is_leader:
        plan.role.follow(ranks)
        return None
    dp = plan.dims.dp
    if dp == 1:
        return LaunchedReplicas(ranks, plan.role.start(ranks), [])
    store = torchrun_store(env, STARTUP_S)
    if ranks.replica == 0:
        authkey = secrets.token_bytes(32)
        listener = Listener((torchrun_host_address(), 0), authkey=authkey)
        host, port = listener.address
        store.set(ROUTER_KEY, json.dumps({"host": host, "port": port, "authkey": authkey.hex()}))
        return _gather(plan.role, ranks, listener, dict.fromkeys(range(1, dp)), dp)
    where = json.loads(store.get(ROUTER_KEY))
    conn = Client((where["host"], where["port"]), authkey=bytes.fromhex(where["authkey"]))
    conn.send(ranks.replica)
    _lead(plan.role, ranks, conn)
    return None


def _leader_main(address, authkey: bytes, preload: tuple[str, ...] = (), plan: _Plan | None = None,
                 index: int = 0) -> None:
    """Body of a spawned replica leader: connect to the process that serves, launch the replica's
    ranks, lead them. Given its ``plan`` it leads replica ``index`` at once (``launch_replicas``);
    without, it imports ``preload`` and warms a fork server for its ranks first, then waits to be
    sent the plan and the index (``ReplicaStarter``)."""
    configure_rank_process(0, 1, name=None if plan else "tensorpar-standby")  # dies with its parent
    if plan is None:
        for module in preload:
            importlib.import_module(module)
        fork_ranks_from_server(preload)
    conn = Client(address, authkey=authkey)
    if plan is None:
        try:
            plan, index = conn.recv()
        except (EOFError, OSError):  # a standby no longer needed
            os._exit(0)
    else:
        conn.send(index)
    configure_rank_process(index * plan.dims.replica_size, plan.dims.world_size)
    try:
        ranks = plan.launch(index)
    except BaseException as e:  # noqa: BLE001 - the serving process reports it
        conn.send(("failed", _why(e)))
        conn.close()
        os._exit(1)
    os._exit(0 if _lead(plan.role, ranks, conn) else 1)


def _why(e: BaseException) -> str:
    """A failure to start in one line: a ``TensorparError``'s message as the user would see it."""
    return one_line(e) if not isinstance(e, TensorparError) else str(e).strip().splitlines()[0]


def _lead(role: ReplicaRole, ranks: Ranks, conn: Connection) -> bool:
    """Start this replica's engine, say whether it started, serve until told to stop; whether it
    ended healthy."""
    try:
        engine = role.start(ranks)
    except BaseException as e:  # noqa: BLE001 - replica 0's leader reports it
        conn.send(("failed", _why(e)))
        conn.close()
        return False
    conn.send(("ready", None))
    return role.serve(engine, conn)


class ReplicaStarter:
    """Starts replica leaders from this process, which runs no rank of them (a server's front end
    without weights), keeping one started ahead of need once ``warm`` is called: a standby that
    has imported ``preload`` (and torch) and warmed the fork server its ranks will come from
    (``fork_ranks_from_server``), so that a replica replacing a failed one starts in its weights'
    load time instead of two interpreter starts more.

    Leaders die with the thread that started them (Linux's parent-death signal follows the
    thread), so one thread of this starter, alive as long as it is, starts them all."""

    def __init__(self, preload: tuple[str, ...] = ()):
        self.preload = preload
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tensorpar-spawn")
        self._lock = threading.Lock()
        self._standby: concurrent.futures.Future | None = None  # of (process, connection)
        self._closed = False

    def start(self, dims: ParallelDims, factory: Factory, args: tuple, role: ReplicaRole, index: int = 0,
              device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S, use_shm: bool = True,
              standby: bool = True) -> ReplicaLeader:
        """Replica ``index`` of ``dims`` led by the standby (or, without one or with ``standby``
        False, a leader started now), once its engine is ready. Raises ``TensorparError`` naming
        why it did not start (its process is gone by then)."""
        with self._lock:
            standby, self._standby = (self._standby, None) if standby else (None, self._standby)
        deadline = time.monotonic() + STARTUP_S
        proc, conn = standby.result() if standby is not None else self._spawn()
        try:
            conn.send((_Plan(dims, factory, args, role, device, timeout_s, use_shm), index))
            while not conn.poll(0.02):
                if proc.exitcode is not None:
                    raise TensorparError(f"the replica's leader process {describe_exit(proc.exitcode)}")
                if time.monotonic() > deadline:
                    raise TensorparError(f"the replica did not start within {STARTUP_S:.0f} s")
            kind, payload = conn.recv()
            if kind == "failed":
                raise TensorparError(f"replica {index} of {dims.dp} failed to start: {payload}" if dims.dp > 1 else payload)
        except (OSError, EOFError):
            _kill([proc])
            raise TensorparError(f"the replica's leader process {describe_exit(proc.exitcode)}") from None
        except BaseException:
            _kill([proc])
            raise
        return ReplicaLeader(index, conn, proc)

    def warm(self) -> None:
        """Start a standby leader in the background, unless one is."""
        with self._lock:
            if self._standby is None and not self._closed:
                self._standby = concurrent.futures.ThreadPoolExecutor(1).submit(self._spawn)

    def wait_warm(self) -> None:
        """Wait until the standby, if one is starting, is ready (one that failed is dropped)."""
        standby = self._standby
        if standby is not None and standby.exception() is not None:
            with self._lock:
                if self._standby is standby:
                    self._standby = None

    def close(self) -> None:
        """Stop the standby, if any."""
        with self._lock:
            standby, self._standby, self._closed = self._standby, None, True
        if standby is not None:
            try:
                proc, conn = standby.result()
                conn.close()
                _kill([proc])
            except TensorparError:
                pass
        self._thread.shutdown(wait=False)

    def _spawn(self):
        """A leader process, connected, waiting to be told which replica to lead: (process, connection)."""
        authkey = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        proc = mp.get_context("spawn").Process(target=_leader_main, args=(listener.address, authkey, self.preload),
                                               name="tensorpar-standby", daemon=False)
        self._thread.submit(proc.start).result()
        got: list = []

        def accept() -> None:
            try:
                got.append(listener.accept())
            except OSError:
                pass

        threading.Thread(target=accept, daemon=True).start()
        try:
            while not got:
                if proc.exitcode is not None:
                    raise TensorparError(f"a replica's leader process {describe_exit(proc.exitcode)} as it started")
                time.sleep(0.02)
        finally:
            listener.close()
        return proc, got[0]


def _gather(role: ReplicaRole, ranks: Ranks, listener: Listener, procs: dict, n: int) -> LaunchedReplicas:
    """Start replica 0's engine, then wait for the other leaders; on any failure stop what started."""
    engine = None
    try:
        engine = role.start(ranks)
        leaders = _accept(listener, procs, time.monotonic() + STARTUP_S, n)
    except BaseException:
        if engine is not None:
            role.stop(engine)
        _kill(procs.values())
        raise
    finally:
        listener.close()
    return LaunchedReplicas(ranks, engine, leaders)


def _accept(listener: Listener, procs: dict, deadline: float, n: int) -> list[ReplicaLeader]:
    """The leaders of the replicas ``procs`` names (of ``n``), in order, once each is ready
    (``procs``: replica index -> its process, or None where torchrun started it)."""
    conns: dict[int, Connection] = {}

    def accept() -> None:
        for _ in procs:
            try:
                conn = listener.accept()
                conns[conn.recv()] = conn
            except (OSError, EOFError):
                return

    threading.Thread(target=accept, name="tensorpar-accept", daemon=True).start()
    ready: dict[int, ReplicaLeader] = {}
    while len(ready) < len(procs):
        for i, proc in procs.items():
            if i in ready:
                continue
            conn = conns.get(i)
            if conn is not None and conn.poll():
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    kind, payload = "failed", "it closed its connection"
                if kind == "failed":
                    raise TensorparError(f"replica {i} of {n} failed to start: {payload}" if n > 1 else payload)
                ready[i] = ReplicaLeader(i, conn, proc)
            elif proc is not None and proc.exitcode is not None:
                raise TensorparError(f"replica {i} of {n} failed to start: its process {describe_exit(proc.exitcode)}"
                                     if n > 1 else f"the engine's leader process {describe_exit(proc.exitcode)}")
        if time.monotonic() > deadline:
            missing = sorted(set(procs) - set(ready))
            raise TensorparError(f"replicas {missing} of {n} did not start within {STARTUP_S:.0f} s")
        time.sleep(0.02)
    return [ready[i] for i in sorted(procs)]


def _kill(procs) -> None:
    for p in procs:
        if p is not None:
            p.kill()
            p.join()
