"""Continuous batching on the leader rank: the contract between the HTTP layer and the engine.

The HTTP layer (``tensorpar.serve``) runs in the rank-0 process. It turns each API request into
one or more ``ServeRequest`` and hands them to ``ServingEngine.submit`` with a callback; the
engine's loop thread calls the callback with a ``TokenEvent`` for every generated token and once
more, with ``finished=True``, at the end (also on abort or error). Callbacks run on the engine
thread: they must only hand the event over (``loop.call_soon_threadsafe``), never block.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from tensorpar.distributed.groups import DEFAULT_TIMEOUT_S, destroy_group
from tensorpar.errors import TensorparError
from tensorpar.runtime.engine import Engine, EngineSpec
from tensorpar.runtime.ranks import start_ranks
from tensorpar.runtime.sampling import SamplingParams, sample


@dataclass
class ServeRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    logprobs: int = 0  # number of top log-probabilities to report per token (0: only the chosen one)


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None  # None on the final event when it carries no token (abort, error)
    text_delta: str  # text added by this token (stop strings already cut off); "" when none
    logprob: float | None = None  # log-probability of token_id under the sampling distribution's logits
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # [(token id, logprob)], best first
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" when finished
    error: str | None = None  # the message when finish_reason == "error"


Callback = Callable[[TokenEvent], None]


class _Sequence:
    """A request while it runs: its cache slot, generated tokens and the text sent so far."""

    def __init__(self, req: ServeRequest, callback: Callback, slot: int, generator):
        self.req, self.callback, self.slot, self.generator = req, callback, slot, generator
        self.out: list[int] = []
        self.sent = ""  # text already sent in events

    @property
    def length(self) -> int:
        return len(self.req.prompt_token_ids) + len(self.out)


class ServingEngine:
    """The leader's side of serving: admits requests into cache slots as they arrive, runs one
    model step at a time over everything that runs (new prompts are prefilled, then every running
    sequence advances by one token), and reports each token through its request's callback.

    A request joins and leaves the running batch at token granularity; when every slot is busy,
    new requests wait in arrival order. All ranks run every step: the leader broadcasts each
    step's plan (``Engine.step``); followers run ``Engine.follow_forever``.
    """

    IDLE_WAIT_S = 0.5  # idle leader: how often it sends followers a keep-alive

    def __init__(
        self,
        model: str = "smollm2-135m",
        tp: int = 1,
        dtype: str = "auto",
        device: str = "cpu",
        max_num_seqs: int = 32,
        max_model_len: int | None = None,
        timeout_s: float | None = None,
        comm: str = "auto",
        progress: bool = True,
    ):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        timeout_s = timeout_s or DEFAULT_TIMEOUT_S
        spec = EngineSpec(model=model, dtype=dtype, device=device, progress=progress)

        def check_length(config) -> None:
            limit = config.max_position_embeddings
            if max_model_len is not None and not 1 <= max_model_len <= limit:
                raise ValueError(f"--max-model-len {max_model_len} must be from 1 to the model's context of {limit} tokens")

        config, ctx, self._ranks = start_ranks(spec, tp, timeout_s, comm, leader_here=True, check=check_length)
        self.max_model_len = max_model_len or min(config.max_position_embeddings, 2048)
        self.model_name, self.max_num_seqs = model, max_num_seqs
        self.tp, self.backend = ctx.world_size, ctx.backend
        self.engine = Engine(spec, ctx)
        if not ctx.is_leader:
            self.tokenizer = None
            return  # a torchrun follower: the caller runs self.engine.follow_forever()
        if self._ranks is not None:
            self._ranks.wait_ready()
            self._ranks.start("follow_forever")
        self.tokenizer = self.engine.tokenizer
        if self.tokenizer is None:
            raise TensorparError(f"{model} ships no tokenizer; serving needs one")
        self.engine.allocate(max_num_seqs, self.max_model_len)
        self._lock = threading.Condition()
        self._waiting: list[tuple[ServeRequest, Callback]] = []
        self._running: dict[str, _Sequence] = {}
        self._aborts: set[str] = set()
        self._free = list(range(max_num_seqs - 1, -1, -1))
        self._stopping = False
        self.healthy, self.error = True, None
        self._thread = threading.Thread(target=self._loop, name="tensorpar-engine", daemon=True)
        self._thread.start()

    # ---- the HTTP side's interface -----------------------------------------------------------

    def submit(self, req: ServeRequest, callback: Callback) -> None:
        with self._lock:
            if not self.healthy or self._stopping:
                callback(TokenEvent(req.request_id, None, "", finished=True, finish_reason="error",
                                    error=self.error or "the server is shutting down"))
                return
            self._waiting.append((req, callback))
            self._lock.notify()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)
            self._lock.notify()

    def stats(self) -> dict:
        with self._lock:
            used = sum(s.length for s in self._running.values())
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "kv_cache_usage": used / (self.max_num_seqs * self.max_model_len),
                "healthy": self.healthy,
                "error": self.error,
            }

    def shutdown(self) -> None:
        """Stop admitting, end what runs with "abort", stop the follower ranks."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=30)
        if self._ranks is not None:
            self._ranks.close(force=not self.healthy)
        destroy_group(self.engine.ctx)

    # ---- the engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        break
                    if not self._waiting and not self._running and not self._aborts:
                        self._lock.wait(self.IDLE_WAIT_S)
                        idle = not self._waiting and not self._running and not self._stopping
                    else:
                        idle = False
                    aborts, self._aborts = self._aborts, set()
                    for req, cb in [(r, c) for r, c in self._waiting if r.request_id in aborts]:
                        cb(TokenEvent(req.request_id, None, "", finished=True, finish_reason="abort"))
                    self._waiting = [(r, c) for r, c in self._waiting if r.request_id not in aborts]
                    for rid in aborts:
                        seq = self._running.get(rid)
                        if seq is not None:
                            self._finish(seq, "abort")
                    admitted = []
                    while self._waiting and self._free:
                        req, cb = self._waiting.pop(0)
                        admitted.append((req, cb, self._free.pop()))
                if idle:
                    self.engine.keepalive()
                    continue
                for req, cb, slot in admitted:
                    self._prefill(req, cb, slot)
                if self._running:
                    self._decode()
            self._end_all("abort", None)
            self.engine.shutdown_followers()
        except Exception as e:  # a rank died or a collective failed: nothing more can run
            failure = self._ranks.failure() if self._ranks is not None else None
            message = str(failure) if failure is not None else f"{type(e).__name__}: {e}"
            with self._lock:
                self.healthy, self.error = False, message
            self._end_all("error", message)

    def _end_all(self, reason: str, error: str | None) -> None:
        with self._lock:
            for seq in list(self._running.values()):
                self._finish(seq, reason, error)
            for req, cb in self._waiting:
                cb(TokenEvent(req.request_id, None, "", finished=True, finish_reason=reason, error=error))
            self._waiting = []

    def _prefill(self, req: ServeRequest, callback: Callback, slot: int) -> None:
        gen = None
        if not req.params.greedy:
            gen = torch.Generator().manual_seed(req.params.seed if req.params.seed is not None
                                                else int(torch.seed() % 2**63))
        seq = _Sequence(req, callback, slot, gen)
        with self._lock:
            self._running[req.request_id] = seq
        ids = req.prompt_token_ids
        logits = self.engine.step([ids], [list(range(len(ids)))], [slot], len(ids))
        self._advance([seq], logits)

    def _decode(self) -> None:
        seqs = list(self._running.values())
        positions = [s.length - 1 for s in seqs]
        logits = self.engine.step([[s.out[-1]] for s in seqs], [[p] for p in positions],
                                  [s.slot for s in seqs], max(positions) + 1)
        self._advance(seqs, logits)

    def _advance(self, seqs: list[_Sequence], logits) -> None:
        """Sample one token for each sequence, report it, and retire finished ones."""
        logits = logits.float()
        norm = torch.logsumexp(logits, dim=-1).tolist()  # log-prob = logit - logsumexp(logits)
        best = logits.argmax(dim=-1).tolist()  # every greedy row at once
        for row, seq in enumerate(seqs):
            p = seq.req.params
            token = best[row] if p.greedy else sample(logits[row], p, seq.generator)
            seq.out.append(token)
            logprob = float(logits[row, token]) - norm[row]
            top = []
            if seq.req.logprobs:
                values, ids = torch.topk(logits[row], seq.req.logprobs)
                top = [(i, v - norm[row]) for i, v in zip(ids.tolist(), values.tolist())]
            reason = None
            if token in self.engine.eos_ids and not p.ignore_eos:
                reason = "stop"
            text = self.tokenizer.decode(seq.out, skip_special_tokens=True)
            hits = [text.find(s) for s in p.stop if s in text]
            if hits:
                text, reason = text[: min(hits)], "stop"
            if reason is None and (len(seq.out) >= p.max_new_tokens or seq.length >= self.max_model_len):
                reason = "length"
            if reason is None:
                # hold back an unfinished character and anything that may begin a stop string
                hold = max((len(s) - 1 for s in p.stop), default=0)
                ready = text[: len(text) - hold] if hold else text
                if ready.endswith("\ufffd"):
                    ready = ready.rstrip("\ufffd")
            else:
                ready = text
            delta = ready[len(seq.sent):] if ready.startswith(seq.sent) else ""
            seq.sent += delta
            seq.callback(TokenEvent(seq.req.request_id, token, delta, logprob, top))
            if reason is not None:
                with self._lock:
                    self._finish(seq, reason)

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        """Retire ``seq`` (lock held): free its slot and send its final event."""
        if self._running.pop(seq.req.request_id, None) is None:
            return
        self._free.append(seq.slot)
        seq.callback(TokenEvent(seq.req.request_id, None, "", finished=True, finish_reason=reason, error=error))
