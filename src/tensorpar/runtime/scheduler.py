"""Continuous batching on the leader: the one generation loop of ``LLM``, ``tensorpar generate``
and ``tensorpar serve``.

Requests wait in arrival order for a free KV-cache slot. Each ``step`` is one model step over a
budget of ``max_num_batched_tokens`` new tokens: first one decode token for every running
sequence that has its first token, then prompt tokens, oldest sequence first: the rest of a
prompt already begun, then the prompts of newly admitted requests (every prompt of a step packed
beside the decodes: ``step.Part``). With ``chunked_prefill``, while sequences decode, a prompt
longer than what is left of the budget runs as chunks over several steps, so that a long prompt
never stalls the running sequences for longer than one budget's worth of tokens. Otherwise
prompts run whole, packed up to a budget of at least ``max_model_len`` beside the decodes (as vLLM
requires without chunking): a step that decodes nothing has no stream to keep at pace, and a
prompt in one piece prefills fastest (causal attention, the weights read once). LongRoPE prompts
that reach the pretrained length always run whole (``ModelConfig.whole_prompts_from``).

A request that asks for its prompt's log-probabilities is scored first, in a step of its own
(``step.score``: every position's logits, without the cache), before it waits for a slot; one
that asks for no new token (``max_new_tokens=0``) ends there. A prompt's last chunk yields its
first token. A request joins and leaves the running batch at token granularity; its tokens, text
and end are its ``Sequence``'s business, reported through its sink as ``TokenEvent``s.

``add``, ``abort`` and ``stats`` may be called from any thread; ``step`` runs on one.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

from tensorpar.runtime import step as S
from tensorpar.runtime.model_runner import ModelRunner
from tensorpar.runtime.request import Request, Sink, TokenEvent, score_prompt
from tensorpar.runtime.sampling import apply_controls, sample
from tensorpar.runtime.sequence import Sequence, final_event
from tensorpar.runtime.spec import DEFAULT_MAX_NUM_BATCHED_TOKENS


class Scheduler:
    def __init__(self, runner: ModelRunner, tokenizer, eos_ids: set[int], max_num_seqs: int, max_model_len: int,
                 max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS, chunked_prefill: bool = True):
        self.runner, self.tokenizer, self.eos_ids = runner, tokenizer, eos_ids
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.max_num_batched_tokens, self.chunked_prefill = max_num_batched_tokens, chunked_prefill
        # new tokens of a step that runs whole prompts: any prompt fits beside the decodes
        self.whole_budget = max(max_num_batched_tokens, max_model_len + max_num_seqs)
        config = getattr(runner, "config", None)
        self.whole_prompts_from = config.whole_prompts_from if config is not None else None
        self.lock = threading.Condition()
        self.waiting: deque[tuple[Request, Sink]] = deque()
        self.running: dict[str, Sequence] = {}
        self.aborts: set[str] = set()
        self.free: list[int] = []
        self.scored: set[str] = set()  # waiting requests whose prompt log-probabilities are sent
        self.closed: str | None = None  # why requests are refused, once ``close`` has run
        self.timings = {"prefill_s": 0.0, "prefill_steps": 0, "decode_s": 0.0, "decode_steps": 0}

    # ---- any thread ----------------------------------------------------------------------------

    def add(self, request: Request, sink: Sink) -> None:
        with self.lock:
            if self.closed is not None:
                sink(final_event(request.request_id, "error", self.closed))
                return
            self.waiting.append((request, sink))
            self.lock.notify()

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.aborts.add(request_id)
            self.lock.notify()

    def stats(self) -> dict:
        with self.lock:
            used = sum(s.length for s in self.running.values())
            capacity = self.runner.cache.slots * self.runner.cache.max_len if self.runner.cache else 0
            counts = {"running": len(self.running), "waiting": len(self.waiting),
                      "kv_cache_usage": used / capacity if capacity else 0.0,
                      "free_slots": len(self.free)}
        return {**counts, "experts": self.runner.expert_load()}  # (read without holding up the engine)

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until there is something to do (or ``timeout_s`` passes); whether there is."""
        with self.lock:
            if not self.has_work():
                self.lock.wait(timeout_s)
            return self.has_work()

    # ---- the stepping thread -------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.aborts)

    def reserve(self, slots: int, max_len: int) -> None:
        """A KV cache of at least ``slots`` x ``max_len`` (grown only while nothing runs)."""
        slots = min(slots, self.max_num_seqs)
        max_len = min(max_len, self.max_model_len)
        cache = self.runner.cache
        if cache is not None and cache.fits(slots, max_len):
            return
        if self.running:
            raise RuntimeError("the KV cache cannot grow while sequences run")
        if cache is not None:
            slots, max_len = max(slots, cache.slots), max(max_len, cache.max_len)
        self.runner.allocate(slots, max_len)
        self.free = list(range(slots - 1, -1, -1))

    def step(self) -> None:
        """Aborts, prompt scoring, admissions, then one model step: decode tokens and prompt tokens
        within the budget."""
        self._score_prompts()
        with self.lock:
            aborts, self.aborts = self.aborts, set()
            for req, sink in [(r, s) for r, s in self.waiting if r.request_id in aborts]:
                sink(final_event(req.request_id, "abort"))
            self.waiting = deque((r, s) for r, s in self.waiting if r.request_id not in aborts)
            self.scored &= {r.request_id for r, _ in self.waiting}
            for req, sink in [(r, s) for r, s in self.waiting if self._done_before_start(r)]:
                sink(final_event(req.request_id, "length"))
            self.waiting = deque((r, s) for r, s in self.waiting if not self._done_before_start(r))
            for rid in aborts:
                if rid in self.running:
                    self._retire(self.running[rid], "abort")
            decodes = [s for s in self.running.values() if s.out]  # every one that has its first token
            chunking = self.chunked_prefill and bool(decodes)  # (chunks keep running streams at pace)
            budget = (self.max_num_batched_tokens if chunking else self.whole_budget) - len(decodes)
            chunks: list[tuple[Sequence, int, int]] = []  # (sequence, first prompt token, last + 1)
            for seq in [s for s in self.running.values() if not s.out]:  # prompts begun in earlier steps
                budget = self._take_prompt(seq, budget, chunks, chunking, bool(decodes))
            while self.waiting and self.free and (budget > 0 or not (decodes or chunks)):
                req, sink = self.waiting[0]
                if not chunking and len(req.prompt_token_ids) > budget and (decodes or chunks):
                    break  # a whole prompt waits for a step with room for it
                if req.params.prompt_logprobs is not None and req.request_id not in self.scored:
                    break  # scored at the next step's start
                self.waiting.popleft()
                self.scored.discard(req.request_id)
                seq = Sequence(req, sink, self.free.pop(), self.tokenizer, self.eos_ids, self.max_model_len)
                self.running[req.request_id] = seq
                budget = self._take_prompt(seq, budget, chunks, chunking, bool(decodes))
        if not (decodes or chunks):
            return
        parts = [S.decode_part([s.last_token for s in decodes], [s.length - 1 for s in decodes],
                               [s.slot for s in decodes])] if decodes else []
        parts += [S.chunk(seq.request.prompt_token_ids, start, stop, seq.slot) for seq, start, stop in chunks]
        rows = decodes + [seq if stop == len(seq.request.prompt_token_ids) else None for seq, _, stop in chunks]
        t = time.perf_counter()
        out = self.runner.send(S.step(parts, self._logits_mode([s for s in rows if s is not None])))
        for seq, _, stop in chunks:
            seq.computed = stop
        self._advance(rows, out)
        kind = "prefill" if chunks else "decode"
        self.timings[f"{kind}_s"] += time.perf_counter() - t
        self.timings[f"{kind}_steps"] += 1

    def _done_before_start(self, req: Request) -> bool:
        """Generates nothing, and has had its prompt scored if it asked for that."""
        return req.params.max_new_tokens == 0 and (req.params.prompt_logprobs is None or req.request_id in self.scored)

    def _score_prompts(self) -> None:
        """Send the prompt log-probabilities of waiting requests that ask for them, oldest first,
        one scoring step each, up to the step's token budget (at least one prompt)."""
        with self.lock:
            todo = [(r, s) for r, s in self.waiting
                    if r.params.prompt_logprobs is not None and r.request_id not in self.scored | self.aborts]
        budget = self.max_num_batched_tokens
        for req, sink in todo:
            if budget <= 0:
                break
            prompt = req.prompt_token_ids
            t = time.perf_counter()
            logits = self.runner.send(S.score(prompt))  # [len(prompt), vocab]
            sink(TokenEvent(req.request_id, None, "", prompt_logprobs=score_prompt(logits, prompt,
                                                                                  req.params.prompt_logprobs)))
            self.timings["prefill_s"] += time.perf_counter() - t
            budget -= len(prompt)
            with self.lock:
                self.scored.add(req.request_id)

    def _take_prompt(self, seq: Sequence, budget: int, chunks: list, chunking: bool, decoding: bool) -> int:
        """Schedule what of ``seq``'s prompt fits in ``budget`` (all of it when not chunking, where
        the step has room or nothing else to run); the budget left."""
        prompt = len(seq.request.prompt_token_ids)
        left = prompt - seq.computed
        chunked = chunking and (self.whole_prompts_from is None or prompt < self.whole_prompts_from)
        take = min(left, budget) if chunked else left
        if take <= 0 or (not chunked and left > budget and (decoding or chunks)):
            return budget
        chunks.append((seq, seq.computed, seq.computed + take))
        return budget - take

    def close(self, reason: str, error: str | None = None) -> None:
        """End every request, running or waiting, and refuse new ones (shutdown, or a failure no
        step can survive)."""
        with self.lock:
            self.closed = error or "the engine is shut down"
            for seq in list(self.running.values()):
                self._retire(seq, reason, error)
            for req, sink in self.waiting:
                sink(final_event(req.request_id, reason, error))
            self.waiting.clear()

    # ---- inside a step -------------------------------------------------------------------------

    @staticmethod
    def _logits_mode(seqs: list[Sequence]) -> int:
        """Greedy rows that report no top log-probabilities need only their argmax and its log-probability."""
        return S.GREEDY if all(s.params.greedy and not s.params.logprobs and not s.params.controls_logits
                               for s in seqs) else S.FULL

    def _advance(self, seqs: list[Sequence | None], out) -> None:
        """Give each sequence its next token (from the step's output on the leader, a row each;
        None: a row that yields no token, a prompt chunk before the last), retire finished ones."""
        if isinstance(out, tuple):  # GREEDY: (ids [B], logprobs [B])
            ids, logprobs = out[0].tolist(), out[1].tolist()
            for seq, token, logprob in zip(seqs, ids, logprobs):
                if seq is not None:
                    self._take(seq, token, logprob, [])
            return
        logits = out.float()  # [B, vocab]
        norm = torch.logsumexp(logits, dim=-1).tolist()  # log-prob = logit - logsumexp(logits)
        live = [row for row, seq in enumerate(seqs) if seq is not None]
        chosen = logits  # what the choice is made from: the logits after each row's controls
        if any(seqs[row].params.controls_logits for row in live):
            chosen = logits.clone()
            chosen[live] = apply_controls(logits[live], [seqs[r].params for r in live],
                                          [seqs[r].request.prompt_token_ids for r in live], [seqs[r].out for r in live],
                                          [set() if seqs[r].params.ignore_eos else self.eos_ids for r in live])
        best = chosen.argmax(dim=-1).tolist()  # every greedy row at once
        for row, seq in enumerate(seqs):
            if seq is None:
                continue
            p = seq.params
            token = best[row] if p.greedy else sample(chosen[row], p, seq.generator)
            top = []
            if p.logprobs:
                values, ids = torch.topk(logits[row], p.logprobs)
                top = [(i, v - norm[row]) for i, v in zip(ids.tolist(), values.tolist())]
            self._take(seq, token, float(logits[row, token]) - norm[row], top)

    def _take(self, seq: Sequence, token: int, logprob: float, top: list) -> None:
        seq.append(token, logprob, top)
        if seq.finish_reason is not None:
            with self.lock:
                self._retire(seq, seq.finish_reason)

    def _retire(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Free ``seq``'s slot and send its final event (lock held)."""
        if self.running.pop(seq.request_id, None) is None:
            return
        self.free.append(seq.slot)
        seq.end(reason, error)
