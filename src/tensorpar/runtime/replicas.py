"""Data-parallel serving: ``dp`` independent replicas of one tp x pp layout behind one endpoint.

Each replica is a ``ServingEngine`` over a process group of its own (one group per process, so
every replica's leader is a process of its own). Replica 0's leader is the server's process; the
leaders of replicas 1..dp-1 are spawned here (each spawning its own ranks), or are torchrun's
ranks ``d * tp * pp``. They connect back over a ``multiprocessing.connection`` socket, which
carries requests in and token events and stats out (``RemoteReplica`` on the server's side,
``serve_replica`` on the replica's).

``ReplicaSet`` is the ``ServingBackend`` the HTTP layer sees: each request goes to the healthy
replica with the fewest outstanding requests (ties to the lowest index). It is healthy while any
replica is; its ``error`` names each replica that is down. A replica that fails ends its own
requests with "error" and the others go on (on one machine; under torchrun, torchrun ends the
whole job when one of its ranks dies).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import secrets
import socket
import threading
import time
from multiprocessing.connection import Client, Connection, Listener

from tensorpar.distributed.host import configure_rank_process
from tensorpar.distributed.launch import torchrun_env, torchrun_store
from tensorpar.distributed.ranks import describe_exit
from tensorpar.errors import TensorparError, one_line
from tensorpar.runtime.request import Request, Sink, TokenEvent
from tensorpar.runtime.sequence import final_event
from tensorpar.runtime.serving import ServingEngine, launch_engine
from tensorpar.runtime.spec import EngineSpec

STARTUP_S = 900.0  # how long the server waits for a replica to load its model
STATS_EVERY_S = 0.25  # how often a replica reports its stats to the server
ROUTER_KEY = "tensorpar/router"  # where, in torchrun's store, the server says where replica leaders connect


# ---- the server's side ---------------------------------------------------------------------------


class RemoteReplica:
    """A replica whose leader is another process, seen through its connection: the same
    ``submit`` / ``abort`` / ``stats`` / ``shutdown`` / ``healthy`` as a ``ServingEngine``."""

    def __init__(self, index: int, conn: Connection, process=None):
        self.index, self.conn, self.process = index, conn, process
        self.healthy, self.error = True, None
        self._stats: dict = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0}
        self._sinks: dict[str, Sink] = {}
        self._lock, self._send_lock = threading.Lock(), threading.Lock()
        self._closing = False
        self._reader = threading.Thread(target=self._read, name=f"tensorpar-replica{index}", daemon=True)
        self._reader.start()

    def submit(self, request: Request, sink: Sink) -> None:
        with self._lock:
            if self.healthy:
                self._sinks[request.request_id] = sink
        if request.request_id not in self._sinks:
            sink(final_event(request.request_id, "error", f"replica {self.index} is down: {self.error}"))
            return
        self._send(("submit", request))

    def abort(self, request_id: str) -> None:
        if request_id in self._sinks:
            self._send(("abort", request_id))

    def stats(self) -> dict:
        return {**self._stats, "healthy": self.healthy, "error": self.error}

    def shutdown(self) -> None:
        self._closing = True
        if self.healthy:
            self._send(("shutdown", None))
        self._reader.join(timeout=30)
        if self.process is not None:
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.conn.close()

    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self.conn.send(message)
        except (OSError, EOFError):
            self._down(self._gone())

    def _read(self) -> None:
        try:
            while True:
                kind, payload = self.conn.recv()
                if kind == "event":
                    self._deliver(payload)
                elif kind == "stats":
                    self._stats = payload
                elif kind == "down":
                    self._down(payload)
                    return
        except (EOFError, OSError):
            if not self._closing:
                self._down(self._gone())

    def _deliver(self, event: TokenEvent) -> None:
        with self._lock:
            sink = self._sinks.pop(event.request_id) if event.finished else self._sinks.get(event.request_id)
        if sink is not None:
            sink(event)

    def _gone(self) -> str:
        if self.process is not None:
            self.process.join(timeout=2)
            if self.process.exitcode is not None:
                return f"its leader process (pid {self.process.pid}) {describe_exit(self.process.exitcode)}"
        return "its leader process closed the connection"

    def _down(self, why: str) -> None:
        """Mark the replica down and end what it was running with "error" (once)."""
        with self._lock:
            if not self.healthy:
                return
            self.healthy, self.error = False, why
            sinks, self._sinks = self._sinks, {}
        for request_id, sink in sinks.items():
            sink(final_event(request_id, "error", f"replica {self.index} failed: {why}"))


class ReplicaSet:
    """``dp`` replicas as one ``ServingBackend``: least-outstanding-requests balancing, summed
    stats with each replica's under ``replicas``, healthy while any replica is."""

    def __init__(self, replicas: list, layout: str):
        first = replicas[0]  # this process's ServingEngine: the tokenizer and the context check
        self.replicas = replicas
        self.model_name, self.tokenizer, self.inputs = first.model_name, first.tokenizer, first.inputs
        self.sampling_defaults = getattr(first, "sampling_defaults", {})
        self.max_model_len, self.tp, self.layout = first.max_model_len, first.tp, layout
        self._outstanding = [0] * len(replicas)
        self._sent = [0] * len(replicas)
        self._where: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def submit(self, request: Request, sink: Sink) -> None:
        with self._lock:
            live = [i for i, r in enumerate(self.replicas) if r.healthy]
            if live:
                i = min(live, key=lambda j: (self._outstanding[j], j))
                self._outstanding[i] += 1
                self._sent[i] += 1
                self._where[request.request_id] = i
        if not live:
            sink(final_event(request.request_id, "error", self.stats()["error"]))
            return

        def counted(event: TokenEvent) -> None:
            if event.finished:
                with self._lock:
                    self._outstanding[i] -= 1
                    self._where.pop(event.request_id, None)
            sink(event)

        self.replicas[i].submit(request, counted)

    def abort(self, request_id: str) -> None:
        i = self._where.get(request_id)
        if i is not None:
            self.replicas[i].abort(request_id)

    def stats(self) -> dict:
        """The sums of ``running`` and ``waiting``, the mean ``kv_cache_usage`` of the healthy
        replicas, and ``replicas``: each one's stats with the ``requests`` sent to it and those
        ``outstanding``."""
        n = len(self.replicas)
        each = [{**r.stats(), "requests": self._sent[i], "outstanding": self._outstanding[i]}
                for i, r in enumerate(self.replicas)]
        live = [s for s in each if s["healthy"]]
        down = [f"replica {i} of {n} is down: {s['error']}" for i, s in enumerate(each) if not s["healthy"]]
        return {"running": sum(s.get("running", 0) for s in live), "waiting": sum(s.get("waiting", 0) for s in live),
                "kv_cache_usage": sum(s.get("kv_cache_usage", 0.0) for s in live) / len(live) if live else 0.0,
                "healthy": bool(live), "error": "; ".join(down) or None, "replicas": each}

    def shutdown(self) -> None:
        """Shut every replica down at once (each ends what it runs with "abort")."""
        threads = [threading.Thread(target=r.shutdown) for r in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


# ---- the replica's side ----------------------------------------------------------------------------


def serve_replica(conn: Connection, engine: ServingEngine) -> None:
    """Run requests from the server on ``engine`` until it says stop, goes away, or the engine
    fails (then say why): the body of every replica leader but the server's."""
    lock = threading.Lock()

    def send(message) -> None:
        try:
            with lock:
                conn.send(message)
        except (OSError, EOFError):  # the server is gone: the loop below sees it
            pass

    def sink(event: TokenEvent) -> None:  # on the engine thread
        send(("event", event))

    last = 0.0
    try:
        while True:
            if conn.poll(STATS_EVERY_S):
                kind, payload = conn.recv()
                if kind == "submit":
                    engine.submit(payload, sink)
                elif kind == "abort":
                    engine.abort(payload)
                elif kind == "shutdown":
                    break
            stats = engine.stats()
            if not stats["healthy"]:
                send(("down", stats["error"]))
                break
            if time.monotonic() - last >= STATS_EVERY_S:
                send(("stats", stats))
                last = time.monotonic()
    except (EOFError, OSError):
        pass
    finally:
        engine.shutdown()
        conn.close()


def _lead_replica(ranks, max_num_seqs: int, conn: Connection) -> bool:
    """Lead a replica for the server at ``conn``: say whether its engine started, serve until told
    to stop; whether it ended healthy."""
    try:
        engine = ServingEngine(ranks=ranks, max_num_seqs=max_num_seqs)
    except BaseException as e:  # noqa: BLE001 - the server reports it
        conn.send(("failed", one_line(e)))
        conn.close()
        return False
    conn.send(("ready", None))
    serve_replica(conn, engine)
    return engine.healthy


def _replica_main(index: int, spec: EngineSpec, max_num_seqs: int, address, authkey: bytes) -> None:
    """Body of a spawned replica leader: connect to the server, launch the replica's ranks, serve."""
    size = spec.dims.replica_size
    configure_rank_process(index * size, spec.dims.world_size)  # named, dies with the server
    conn = Client(address, authkey=authkey)
    conn.send(index)
    try:
        ranks = launch_engine(spec, max_num_seqs, cores=(index * size, spec.dims.world_size))
    except BaseException as e:  # noqa: BLE001
        conn.send(("failed", one_line(e)))
        conn.close()
        os._exit(1)
    os._exit(0 if _lead_replica(ranks, max_num_seqs, conn) else 1)


def _accept(listener: Listener, procs: list, deadline: float) -> list[RemoteReplica]:
    """The connections of replicas 1..len(procs), once each has loaded its model."""
    conns: dict[int, Connection] = {}

    def accept() -> None:
        for _ in procs:
            try:
                conn = listener.accept()
                conns[conn.recv()] = conn
            except (OSError, EOFError):
                return

    threading.Thread(target=accept, name="tensorpar-accept", daemon=True).start()
    n = len(procs) + 1
    ready: dict[int, RemoteReplica] = {}
    while len(ready) < len(procs):
        for i in range(1, n):
            if i in ready:
                continue
            conn, proc = conns.get(i), procs[i - 1]
            if conn is not None and conn.poll():
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    kind, payload = "failed", "it closed its connection"
                if kind == "failed":
                    raise TensorparError(f"replica {i} of {n} failed to start: {payload}")
                ready[i] = RemoteReplica(i, conn, proc)
            elif proc is not None and proc.exitcode is not None:
                raise TensorparError(f"replica {i} of {n} failed to start: its process {describe_exit(proc.exitcode)}")
        if time.monotonic() > deadline:
            missing = [i for i in range(1, n) if i not in ready]
            raise TensorparError(f"replicas {missing} of {n} did not start within {STARTUP_S:.0f} s")
        time.sleep(0.05)
    return [ready[i] for i in range(1, n)]


def _reachable_host(env) -> str:
    """This host's address on the interface that reaches torchrun's store (loopback when it is here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
        return s.getsockname()[0]


def start_serving(spec: EngineSpec, max_num_seqs: int):
    """The ``ServingBackend`` of ``spec``'s layout with this process as the server, or None when
    this process is another torchrun rank: it then follows its leader, or leads a replica for the
    server, and returns when that ends."""
    dp, env = spec.dims.dp, torchrun_env()
    if env is None and dp == 1:
        return ServingEngine(ranks=launch_engine(spec, max_num_seqs), max_num_seqs=max_num_seqs)
    if env is not None:
        return _torchrun_serving(spec, max_num_seqs, env)
    authkey = secrets.token_bytes(32)
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    quiet = dataclasses.replace(spec, progress=False)  # one set of progress bars: this process's
    mpc = mp.get_context("spawn")
    procs = [mpc.Process(target=_replica_main, args=(i, quiet, max_num_seqs, listener.address, authkey),
                         name=f"tensorpar-dp{i}", daemon=False) for i in range(1, dp)]
    for p in procs:
        p.start()
    replicas: list = []
    try:
        replicas.append(ServingEngine(ranks=launch_engine(spec, max_num_seqs, cores=(0, spec.dims.world_size)),
                                      max_num_seqs=max_num_seqs))
        replicas += _accept(listener, procs, time.monotonic() + STARTUP_S)
    except BaseException:
        for r in replicas:
            r.shutdown()
        for p in procs:
            p.kill()
            p.join()
        raise
    finally:
        listener.close()
    return ReplicaSet(replicas, spec.layout)


def _torchrun_serving(spec: EngineSpec, max_num_seqs: int, env):
    ranks = launch_engine(spec, max_num_seqs)
    if not ranks.is_leader:  # follow this replica's leader
        try:
            ranks.local.follow_forever()
        finally:
            ranks.close()
        return None
    if spec.dims.dp == 1:
        return ServingEngine(ranks=ranks, max_num_seqs=max_num_seqs)
    store = torchrun_store(env, STARTUP_S)
    if ranks.replica == 0:
        authkey = secrets.token_bytes(32)
        listener = Listener((_reachable_host(env), 0), authkey=authkey)
        host, port = listener.address
        store.set(ROUTER_KEY, json.dumps({"host": host, "port": port, "authkey": authkey.hex()}))
        try:
            local = ServingEngine(ranks=ranks, max_num_seqs=max_num_seqs)
            remotes = _accept(listener, [None] * (spec.dims.dp - 1), time.monotonic() + STARTUP_S)
        finally:
            listener.close()
        return ReplicaSet([local, *remotes], spec.layout)
    where = json.loads(store.get(ROUTER_KEY))
    conn = Client((where["host"], where["port"]), authkey=bytes.fromhex(where["authkey"]))
    conn.send(ranks.replica)
    _lead_replica(ranks, max_num_seqs, conn)
    return None
