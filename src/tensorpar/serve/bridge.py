"""From the engine thread to the event loop: the token events of one API request.

One API request becomes ``n`` ``Request``s; their sinks run on the engine's thread and
only hand each event to this request's ``asyncio.Queue`` (``loop.call_soon_threadsafe``). The
handler reads them with ``next()``. ``close()`` aborts whatever has not finished: handlers call
it in ``finally``, so a client that goes away (its stream cancelled, or a watcher seeing the
disconnect) frees its sequences.
"""

from __future__ import annotations

import asyncio
import time

from tensorpar.runtime.request import Request, TokenEvent
from tensorpar.serve.metrics import Metrics

_DISCONNECTED = object()


class ClientDisconnected(Exception):
    pass


class RequestStream:
    def __init__(self, engine, requests: list[Request], metrics: Metrics, arrived: float):
        self.engine, self.metrics, self.arrived = engine, metrics, arrived
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.index = {r.request_id: i for i, r in enumerate(requests)}
        self.pending: set[str] = set()
        self.last_token: dict[str, float] = {}
        self.requests = requests
        self._watcher: asyncio.Task | None = None

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
                last = self.last_token.get(rid)
                if last is None:
                    self.metrics.ttft.observe(now - self.arrived)
                else:
                    self.metrics.itl.observe(now - last)
                self.last_token[rid] = now
            if event.finished:
                self.pending.discard(rid)
                self.metrics.e2e.observe(now - self.arrived)
            return self.index[rid], event
        return None

    def close(self) -> None:
        """Abort every sequence that has not finished (idempotent)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        for rid in sorted(self.pending):
            try:
                self.engine.abort(rid)
            except Exception:
                pass
        self.pending.clear()
