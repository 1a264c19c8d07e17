"""The serving front end that holds no weights: ``tensorpar serve --elastic``, and ``serve --dp N``
on one host.

The HTTP server's process keeps the tokenizer and, for every request in flight, its prompt, its
sampling parameters and the tokens it has streamed. The model runs in replicas this process
starts, each a group of ranks led by a process of its own (``distributed.replicas.ReplicaStarter``,
which keeps one more leader warm; the same ``ServingRole`` as every replica), reached through a
``RemoteReplica``. So any rank may
die, the one that runs a replica's scheduler included, and the server lives on:

- a replica has failed when its leader says so (a rank died, or did not answer within
  ``--timeout``), when its connection closes (the leader itself died), or when it has sent
  nothing for ``timeout_s`` (the leader is stopped or hung; its stats come every 0.25 s). Its
  processes are killed;
- each of its requests in flight resumes from the tokens it streamed (``Request.emitted``): on a
  healthy replica at once, else on the replacement once it is up. The client's stream pauses,
  then goes on: no error event, no token repeated or lost;
- the replica starts again in the background: with ``elastic`` one rank smaller, at once (tp - 1,
  or pp - 1 at tp 1: the largest layout left, refused before loading when it does not fit the
  memory); otherwise at its own layout, up to ``RESTARTS`` times, ``BACKOFF_S`` apart, doubling.

The server is healthy while a replica serves or one is starting; ``stats()["error"]`` (``/health``
says ``degraded``) names the lost rank, the cause and the layout change (``tp 3 -> 2``) while the
capacity is short: a shrunk replica stays so. When no replica is left and none can start, requests
end with "error" and the server exits with one line naming why (``cli/serve.py``).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time

from tensorpar.distributed.ranks import describe_exit
from tensorpar.distributed.replicas import ReplicaStarter
from tensorpar.errors import RankFailure, TensorparError, one_line
from tensorpar.runtime.replicas import STATS_EVERY_S, RemoteReplica, ServingRole
from tensorpar.runtime.request import Request, Sink, TokenEvent
from tensorpar.runtime.sequence import final_event
from tensorpar.runtime.serving import DEFAULT_MAX_MODEL_LEN, reload_refused
from tensorpar.runtime.spec import EngineArgs, EngineSpec, one_rank_fewer
from tensorpar.runtime.worker import Worker, leader_inputs

PRELOAD = ("tensorpar.runtime.worker", "transformers")  # what a standby leader imports ahead (the tokenizer's)
RESTARTS = 3  # tries to bring a failed replica back at its own layout (without --elastic)
BACKOFF_S = 1.0  # before the first; doubled before each next


def say(line: str) -> None:
    print(f"tensorpar: {line}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Flight:
    """A request in flight: as submitted, where its events go, the tokens it has streamed, and
    which submission of it (``epoch``) may still send events."""

    request: Request
    sink: Sink
    tokens: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None  # the replica running it; None while it waits for one
    epoch: int = 0


@dataclasses.dataclass
class _Slot:
    """One replica's place: its layout now, its running ``RemoteReplica`` (None while it starts
    or after it failed for good), and what it lost."""

    index: int
    args: EngineArgs
    spec: EngineSpec
    replica: RemoteReplica | None = None
    starting: bool = True
    sent: int = 0
    outstanding: int = 0
    rank_failures: int = 0
    degraded: str | None = None  # why its capacity is short, while it is

    @property
    def layout(self) -> str:
        """Of one replica: ``tp=2``, ``tp=2 pp=2``."""
        return " ".join(p for p in self.spec.dims.describe().split() if not p.startswith("dp="))


class Frontend:
    """A ``ServingBackend`` over ``args.dp`` spawned replicas (module docstring). Blocks until
    every replica is up; raises ``TensorparError`` when one does not start."""

    says_failures = True  # logs each failure and restart itself (``cli/serve.py``)

    def __init__(self, args: EngineArgs, max_num_seqs: int, elastic: bool = False):
        spec = args.resolve(DEFAULT_MAX_MODEL_LEN)
        self.max_num_seqs, self.elastic, self.timeout_s = max_num_seqs, elastic, spec.timeout_s
        self.model_name, self.max_model_len = spec.model, spec.max_model_len
        self.sampling_defaults = spec.sampling_defaults
        self._lock = threading.RLock()
        self._flights: dict[str, _Flight] = {}
        self._slots = [_Slot(i, args, spec) for i in range(spec.dims.dp)]
        self._stopping, self.submitted, self.fatal = False, 0, None
        self._starter = ReplicaStarter(PRELOAD)
        self._starter.warm()  # (beside the first replicas: ready by the time they are)
        starts = [threading.Thread(target=self._first_start, args=(s,), daemon=True) for s in self._slots]
        for t in starts:
            t.start()
        try:
            self.tokenizer, _, self.inputs = leader_inputs(spec)  # while the replicas load
        finally:
            for t in starts:
                t.join()
        failed = [s.degraded for s in self._slots if s.replica is None]
        if failed:
            self.shutdown()
            raise TensorparError(failed[0])
        if self.tokenizer is None:
            self.shutdown()
            raise TensorparError(f"{spec.model} ships no tokenizer; serving needs one")
        self._starter.wait_warm()  # so that a failure from the first request on costs a warm restart
        self._watchdog = threading.Thread(target=self._watch_silence, name="tensorpar-frontend", daemon=True)
        self._watchdog.start()

    # ---- the HTTP side's interface (``ServingBackend``) ----------------------------------------

    @property
    def tp(self) -> int:
        return self._slots[0].spec.dims.tp

    @property
    def layout(self) -> str:
        layouts = sorted({s.layout for s in self._slots})
        dp = len(self._slots)
        return " / ".join(layouts) + (f" x dp={dp}" if dp > 1 else "") + (", elastic" if self.elastic else "")

    def submit(self, request: Request, sink: Sink) -> None:
        with self._lock:
            if self._stopping or self.fatal:
                sink(final_event(request.request_id, "error", self.fatal or "the server is shutting down"))
                return
            self.submitted += 1
            flight = self._flights[request.request_id] = _Flight(request, sink)
            self._dispatch(flight)

    def abort(self, request_id: str) -> None:
        with self._lock:
            flight = self._flights.get(request_id)
            if flight is None:
                return
            if flight.slot is None:  # waiting for a replica: end it here
                self._finish(flight, final_event(request_id, "abort"))
                return
            replica = self._slots[flight.slot].replica
        if replica is not None:
            replica.abort(request_id)

    def stats(self) -> dict:
        """As ``ReplicaSet.stats``, each replica also with its ``tp``, ``layout`` and
        ``rank_failures``; ``error`` says what is lost while any replica is short."""
        each, down = [], []
        with self._lock:
            for s in self._slots:
                live = s.replica is not None and s.replica.healthy
                own = s.replica.stats() if live else {}
                each.append({**own, "healthy": live, "error": s.degraded, "tp": s.spec.dims.tp, "layout": s.layout,
                             "rank_failures": s.rank_failures, "requests": s.sent, "outstanding": s.outstanding})
                if s.degraded:
                    down.append(s.degraded if len(self._slots) == 1 else f"replica {s.index}: {s.degraded}")
            serving = [e for e in each if e["healthy"]]
            healthy = self.fatal is None and any(s.replica is not None or s.starting for s in self._slots)
        return {"running": sum(e.get("running", 0) for e in serving),
                "waiting": sum(e.get("waiting", 0) for e in serving) + sum(f.slot is None for f in self._flights.values()),
                "kv_cache_usage": sum(e.get("kv_cache_usage", 0.0) for e in serving) / len(serving) if serving else 0.0,
                "healthy": healthy, "error": self.fatal or "; ".join(down) or None, "requests": self.submitted,
                "replicas": each}

    load_weights = reload_refused

    def shutdown(self) -> None:
        """End what runs with "abort" (each replica's own shutdown), stop every replica."""
        with self._lock:
            self._stopping = True
            replicas = [s.replica for s in self._slots if s.replica is not None]
            for flight in [f for f in self._flights.values() if f.slot is None]:
                self._finish(flight, final_event(flight.request.request_id, "abort"))
        threads = [threading.Thread(target=r.shutdown) for r in replicas]
        for t in threads:
            t.start()
        self._starter.close()
        for t in threads:
            t.join()

    # ---- requests (lock held) ------------------------------------------------------------------

    def _dispatch(self, flight: _Flight) -> None:
        """Send ``flight`` (from its streamed tokens on) to the healthy replica with the fewest
        outstanding requests; keep it waiting when none is up but one is starting."""
        live = [s for s in self._slots if s.replica is not None and s.replica.healthy]
        if not live:
            if not any(s.starting for s in self._slots):
                self._finish(flight, final_event(flight.request.request_id, "error", self.fatal or "no replica is up"))
            return
        slot = min(live, key=lambda s: (s.outstanding, s.index))
        flight.slot, flight.epoch = slot.index, flight.epoch + 1
        slot.sent += 1
        slot.outstanding += 1
        r = flight.request
        params = dataclasses.replace(r.params, prompt_logprobs=None) if flight.tokens else r.params  # (sent once)
        request = Request(r.request_id, r.prompt_token_ids, params, emitted=list(flight.tokens))
        slot.replica.submit(request, self._sink(flight, flight.epoch))

    def _sink(self, flight: _Flight, epoch: int) -> Sink:
        def deliver(event: TokenEvent) -> None:  # on the replica's reader thread
            with self._lock:
                if self._flights.get(event.request_id) is not flight or flight.epoch != epoch:
                    return  # from a submission since given up
                if event.token_id is not None:
                    flight.tokens.append(event.token_id)
                if event.finished:
                    self._finish(flight, event)
                else:
                    flight.sink(event)  # (only hands it over: see ``ServingBackend``)

        return deliver

    def _finish(self, flight: _Flight, event: TokenEvent) -> None:
        self._flights.pop(flight.request.request_id, None)
        if flight.slot is not None:
            self._slots[flight.slot].outstanding -= 1
        flight.epoch += 1
        flight.sink(event)

    # ---- replicas ------------------------------------------------------------------------------

    def _start(self, slot: _Slot, standby: bool = True) -> RemoteReplica:
        spec = slot.spec if slot.index == 0 and not slot.rank_failures else dataclasses.replace(slot.spec, progress=False)
        leader = self._starter.start(spec.dims, Worker, (spec, self.max_num_seqs), ServingRole(self.max_num_seqs),
                                     slot.index, spec.device, spec.timeout_s, spec.use_shm, standby)
        return RemoteReplica(leader.index, leader.conn, leader.process, on_down=self._failed)

    def _first_start(self, slot: _Slot) -> None:
        try:
            replica = self._start(slot, standby=False)
        except Exception as e:  # noqa: BLE001 - said by __init__
            slot.degraded, slot.starting = str(e) if isinstance(e, TensorparError) else one_line(e), False
            return
        with self._lock:
            slot.replica, slot.starting = replica, False

    def _watch_silence(self) -> None:
        """Fail a replica whose leader has sent nothing for ``timeout_s`` (it is stopped or hung)."""
        while not self._stopping:
            time.sleep(STATS_EVERY_S)
            for s in list(self._slots):
                r = s.replica
                if r is not None and r.healthy and time.monotonic() - r.heard > self.timeout_s:
                    world = s.spec.dims.replica_size
                    r.kill(str(RankFailure(0, world, f"did not answer within {self.timeout_s:g} s (the replica's leader)")))

    def _failed(self, replica: RemoteReplica, why: str) -> None:
        """``on_down`` of a replica: name what failed, resume its requests elsewhere or hold them,
        start its replacement."""
        with self._lock:
            slot = next((s for s in self._slots if s.replica is replica), None)
            if slot is None or self._stopping:
                return
            code = replica.process.exitcode if replica.process is not None else None
            if code is not None and "failed:" not in why:  # the leader itself died
                why = str(RankFailure(0, slot.spec.dims.replica_size, describe_exit(code)))
            slot.replica, slot.starting = None, True
            slot.rank_failures += 1
            stranded = [f for f in self._flights.values() if f.slot == slot.index]
            for f in stranded:
                slot.outstanding -= 1
                f.slot, f.epoch = None, f.epoch + 1
            slot.degraded = why
            for f in stranded:
                self._dispatch(f)
        what = f"{len(stranded)} request(s) in flight resume" if stranded else "no request was in flight"
        plan = "restarting it smaller" if self.elastic else "restarting it"
        say(f"warning: {why}; {what}; {plan}" + (f" (replica {slot.index})" if len(self._slots) > 1 else ""))
        threading.Thread(target=self._restart, args=(slot, replica, time.monotonic()), daemon=True,
                         name=f"tensorpar-restart{slot.index}").start()

    def _restart(self, slot: _Slot, old: RemoteReplica, since: float) -> None:
        """Bring ``slot`` back (smaller with ``elastic``); the requests held for it then run. When
        it cannot, and no other replica serves, the server has failed (``fatal``)."""
        old.kill(old.error or "failed")
        before, cause = slot.layout, slot.degraded
        tries = 1 if self.elastic else RESTARTS
        why = ""
        for attempt in range(tries):
            if self.elastic:
                shrunk = self._shrink(slot)
                if isinstance(shrunk, str):
                    why = shrunk
                    break
                slot.args, slot.spec = shrunk
            else:
                time.sleep(BACKOFF_S * 2 ** attempt)
            if self._stopping:
                return
            try:
                replica = self._start(slot)
            except Exception as e:  # noqa: BLE001 - said, and tried again or given up
                why = str(e) if isinstance(e, TensorparError) else one_line(e)
                say(f"warning: the replica did not start again ({attempt + 1} of {tries}): {why}")
                continue
            with self._lock:
                if self._stopping:
                    threading.Thread(target=replica.shutdown, daemon=True).start()
                    return
                slot.replica, slot.starting = replica, False
                shrunk = self.elastic and before != slot.layout
                slot.degraded = f"{cause}; {_change(before, slot.layout)}" if shrunk else None
                held = [f for f in self._flights.values() if f.slot is None]
                for f in held:
                    self._dispatch(f)
            self._starter.warm()
            say(f"serving again at {slot.layout} after {time.monotonic() - since:.1f} s"
                + (f" (replica {slot.index})" if len(self._slots) > 1 else "")
                + (f"; {len(held)} request(s) resumed" if held else ""))
            return
        with self._lock:
            slot.starting = False
            slot.degraded = f"{cause}; {why}" if self.elastic else f"{cause}; it did not start again in {tries} tries"
            if not any(s.replica is not None or s.starting for s in self._slots):
                self.fatal = slot.degraded
                for f in list(self._flights.values()):
                    self._finish(f, final_event(f.request.request_id, "error", self.fatal))

    @staticmethod
    def _shrink(slot: _Slot) -> tuple[EngineArgs, EngineSpec] | str:
        """The layout one rank smaller than ``slot``'s (tp - 1, else pp - 1) and its spec, or why
        there is none: it has one rank, or the smaller layout does not fit."""
        args = one_rank_fewer(slot.args, slot.spec.dims)
        if args is None:
            return "no smaller layout is left to serve on"
        try:
            return args, args.resolve(DEFAULT_MAX_MODEL_LEN)
        except TensorparError as e:
            return f"the smaller layout does not fit: {e}"


def _change(before: str, after: str) -> str:
    """``tp=3`` and ``tp=2`` -> ``tp 3 -> 2``; ``tp=1 pp=2`` and ``tp=1`` -> ``tp=1 pp=2 -> tp=1``."""
    b, a = before.split(), after.split()
    if len(b) == len(a) == 1 and b[0].split("=")[0] == a[0].split("=")[0]:
        name = b[0].split("=")[0]
        return f"{name} {b[0].split('=')[1]} -> {a[0].split('=')[1]}"
    return f"{before} -> {after}"
