"""From the engine thread to the event loop: the token events of one API request.

One API request becomes ``n`` ``Request``s; their sinks run on the engine's thread and
only hand each event to this request's ``asyncio.Queue`` (``loop.call_soon_threadsafe``). The
handler reads them with ``next()``. ``close()`` aborts whatever has not finished: handlers call
it in ``finally``, so a client that goes away (its stream cancelled, or a watcher seeing the
disconnect) frees its sequences.

When every sequence has ended (or the request is given up), one line is logged at info level on
the ``tensorpar.serve.requests`` logger: the endpoint, the request's id, its prompt and generated
tokens, how its sequences finished, its time to first token and its latency.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tensorpar.runtime.request import Request, TokenEvent
from tensorpar.serve.metrics import Metrics

_DISCONNECTED = object()
log = logging.getLogger("tensorpar.serve.requests")


class ClientDisconnected(Exception):
    pass


class RequestStream:
    def __init__(self, engine, requests: list[Request], metrics: Metrics, arrived: float, label: str = "",
                 prompt_tokens: int | None = None):
        """``label``: the endpoint, for the log line; ``prompt_tokens``: of the request's prompts
        (each counted once, however many choices it has; default: every sequence's)."""
        self.engine, self.metrics, self.arrived, self.label = engine, metrics, arrived, label
        self.prompt_tokens = sum(len(r.prompt_token_ids) for r in requests) if prompt_tokens is None else prompt_tokens
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.index = {r.request_id: i for i, r in enumerate(requests)}
        self.pending: set[str] = set()
        self.last_token: dict[str, float] = {}
        self.requests = requests
        self._watcher: asyncio.Task | None = None
        self.generated, self.first_token_s, self.reasons = 0, None, []
        self.started: dict[str, tuple[float, float]] = {}  # per sequence: (started running, first token)
        self.tokens: dict[str, int] = {}

    def _callback(self, event: TokenEvent) -> None:  # engine thread: hand over, never block
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def start(self) -> None:
        for r in self.requests:
            self.metrics.prompt_tokens.inc(len(r.prompt_token_ids))
            self.pending.add(r.request_id)
            self.engine.submit(r, self._callback)

    def watch(self, request, every_s: float = 0.25) -> None:
        """Poll ``request.is_disconnected()`` (for responses the server does not cancel itself)."""
        async def poll():
            while not await request.is_disconnected():
                await asyncio.sleep(every_s)
            self.queue.put_nowait(_DISCONNECTED)

        self._watcher = asyncio.ensure_future(poll())

    async def next(self) -> tuple[int, TokenEvent] | None:
        """The next event as (choice index, event); None once every sequence has finished."""
        while self.pending:
            event = await self.queue.get()
            if event is _DISCONNECTED:
                self.close()
                raise ClientDisconnected()
            rid = event.request_id
            if rid not in self.pending:
                continue
            now = time.perf_counter()
            if event.token_id is not None:
                self.metrics.generation_tokens.inc()
                self.generated += 1
                self.tokens[rid] = self.tokens.get(rid, 0) + 1
                if event.admitted_at is not None:
                    self.started[rid] = (event.admitted_at, now)
                last = self.last_token.get(rid)
                if last is None:
                    self.metrics.ttft.observe(now - self.arrived)
                    if self.first_token_s is None:
                        self.first_token_s = now - self.arrived
                else:
                    self.metrics.itl.observe(now - last)
                self.last_token[rid] = now
            if event.finished:
                self.pending.discard(rid)
                self.metrics.e2e.observe(now - self.arrived)
                self.metrics.finished(event.finish_reason or "stop")
                self._phases(rid, now)
                self.reasons.append(event.finish_reason)
                if not self.pending:
                    self._log()
            return self.index[rid], event
        return None

    def _phases(self, rid: str, now: float) -> None:
        """vLLM's per-sequence histograms, at its end: its sizes, and the times of its phases."""
        m, r = self.metrics, self.requests[self.index[rid]]
        m.request_prompt_tokens.observe(len(r.prompt_token_ids))
        m.request_generation_tokens.observe(self.tokens.get(rid, 0))
        m.request_max_tokens.observe(r.params.max_new_tokens)
        if rid in self.started:
            began, first = self.started[rid]
            m.queue_time.observe(max(0.0, began - self.arrived))
            m.prefill_time.observe(max(0.0, first - began))
            m.decode_time.observe(now - first)
            m.inference_time.observe(now - began)

    def close(self) -> None:
        """Abort every sequence that has not finished (idempotent)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self.pending:
            self.reasons += ["abort"] * len(self.pending)
            self._log()
        for rid in sorted(self.pending):
            try:
                self.engine.abort(rid)
            except Exception:
                pass
        self.pending.clear()

    def _log(self) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        rid = self.requests[0].request_id.rsplit("-", 1)[0] if self.requests else "?"
        reasons = ",".join(sorted(set(r or "?" for r in self.reasons)))
        ttft = "-" if self.first_token_s is None else f"{self.first_token_s:.3f}s"
        log.info("%s %s prompt_tokens=%d completion_tokens=%d n=%d finish=%s ttft=%s latency=%.3fs", self.label, rid,
                 self.prompt_tokens, self.generated, len(self.requests), reasons, ttft, time.perf_counter() - self.arrived)
