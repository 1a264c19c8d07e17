"""Data-parallel serving: ``dp`` independent replicas of one tp x pp layout behind one endpoint.

Each replica is a ``ServingEngine`` over a process group of its own, led by a process of its own.
``distributed/replicas.py`` launches them (``launch_replicas``: replica 0's leader is the server's
process; the other leaders are spawned by it, or are torchrun's ranks ``d * tp * pp``) and hands
the server a connection to each other leader once its engine is ready. ``ServingRole`` is what runs
in each replica.

After that handshake a connection carries this protocol (``RemoteReplica`` on the server's side,
``serve_replica`` on the replica's), one ``(kind, payload)`` tuple a message:

- server to replica: ``("submit", Request)``, ``("abort", request_id)``, ``("shutdown", None)``;
- replica to server: ``("event", TokenEvent)`` for each token and each request's end,
  ``("stats", dict)`` every ``STATS_EVERY_S``, and ``("down", why)`` when its engine fails, its
  last message.

``ReplicaSet`` is the ``ServingBackend`` the HTTP layer sees under torchrun: each request goes to
the healthy replica with the fewest outstanding requests (ties to the lowest index). It is healthy
while any replica is; its ``error`` names each replica that is down. A replica that fails ends its
own requests with "error" and the others go on (torchrun ends the whole job when one of its ranks
dies). On one host, ``serve --dp N`` and ``--elastic`` run a front end without weights instead
(``runtime.frontend``), which resumes a failed replica's requests and restarts it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from multiprocessing.connection import Connection

from tensorpar.distributed.ranks import Ranks, describe_exit
from tensorpar.distributed.replicas import launch_replicas
from tensorpar.runtime.request import Request, Sink, TokenEvent
from tensorpar.runtime.sequence import final_event
from tensorpar.runtime.serving import ServingEngine, reload_refused
from tensorpar.runtime.spec import EngineSpec
from tensorpar.runtime.worker import Worker

STATS_EVERY_S = 0.25  # how often a replica reports its stats to the server


# ---- the server's side ---------------------------------------------------------------------------


class RemoteReplica:
    """A replica whose leader is another process, seen through its connection: the same
    ``submit`` / ``abort`` / ``stats`` / ``shutdown`` / ``healthy`` as a ``ServingEngine``.

    When it fails it ends its requests with "error", or, given ``on_down``, calls
    ``on_down(self, why)`` instead, which then owns them. ``heard``: when it last sent anything
    (``time.monotonic()``; it sends its stats every ``STATS_EVERY_S``)."""

    def __init__(self, index: int, conn: Connection, process=None, on_down=None):
        self.index, self.conn, self.process, self.on_down = index, conn, process, on_down
        self.healthy, self.error = True, None
        self.heard = time.monotonic()
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
            if self.on_down is None:  # (else its owner, told of the failure, resumes it)
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
                self.heard = time.monotonic()
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

    def kill(self, why: str) -> None:
        """Declare it failed (``why``) and kill its leader, whose ranks die with it."""
        self._down(why)
        self._closing = True
        if self.process is not None and self.process.is_alive():
            self.process.kill()

    def _down(self, why: str) -> None:
        """Mark the replica down and end what it was running with "error", or hand it to
        ``on_down`` (once)."""
        with self._lock:
            if not self.healthy:
                return
            self.healthy, self.error = False, why
            sinks, self._sinks = self._sinks, {}
        if self.on_down is not None:
            self.on_down(self, why)
            return
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

    load_weights = reload_refused

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
        if event.finish_reason == "error" and not engine.healthy:
            return  # the engine failed: the server ends or resumes its requests on ("down", why)
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


@dataclasses.dataclass(frozen=True)
class ServingRole:
    """What runs in each serving replica (``launch_replicas``' ``ReplicaRole``): a ``ServingEngine``
    on its leader; ``serve_replica`` for the leaders of replicas 1..dp-1."""

    max_num_seqs: int
    steps_on_thread = True  # a ServingEngine steps its worker on its engine thread (``launch(step_thread=)``)

    def start(self, ranks: Ranks) -> ServingEngine:
        return ServingEngine(ranks=ranks, max_num_seqs=self.max_num_seqs)

    def serve(self, engine: ServingEngine, conn: Connection) -> bool:
        serve_replica(conn, engine)
        return engine.healthy

    def follow(self, ranks: Ranks) -> None:
        try:
            ranks.local.follow_forever()
        finally:
            ranks.close()

    def stop(self, engine: ServingEngine) -> None:
        engine.shutdown()


def start_serving(spec: EngineSpec, max_num_seqs: int):
    """The ``ServingBackend`` of ``spec``'s layout with this process as the server, or None when
    this process is another torchrun rank: it then follows its leader, or leads a replica for the
    server, and returns when that ends."""
    quiet = dataclasses.replace(spec, progress=False)  # one set of progress bars: this process's
    launched = launch_replicas(spec.dims, Worker, (spec, max_num_seqs), ServingRole(max_num_seqs), spec.device,
                               spec.timeout_s, spec.use_shm, spawned_args=(quiet, max_num_seqs))
    if launched is None:
        return None
    if not launched.leaders:
        return launched.engine
    remotes = [RemoteReplica(leader.index, leader.conn, leader.process) for leader in launched.leaders]
    return ReplicaSet([launched.engine, *remotes], spec.layout)
