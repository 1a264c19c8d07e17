"""Continuous batching on the leader: what each step of ``LLM``, ``tensorpar generate`` and
``tensorpar serve`` computes, as data. ``schedule()`` returns a ``StepPlan`` (the message every
rank runs, and which sequence each of its output rows belongs to); ``update(plan, sampled)`` takes
what the sampler chose from the step's output. Executing the plan (``ModelRunner.execute``) and
choosing tokens (``Sampler.choose``) happen between the two, elsewhere (``EngineCore.step``):
the scheduler runs no model and samples nothing.

Requests wait in arrival order for KV-cache blocks (``block_manager``): one is admitted when
the blocks its prompt needs, beyond those of a cached prefix it starts with, are free, and at
most ``max_num_seqs`` run at once. Each step is one model step over a budget of
``max_num_batched_tokens`` new tokens: first one decode token for every running sequence that
has its first token, then prompt tokens, oldest sequence first: the rest of a prompt already
begun, then the prompts of newly admitted requests (every prompt of a step packed beside the
decodes: ``messages.Part``). A decoding sequence takes a new block each ``block_size`` tokens; when
none is left, the newest running sequence is preempted: its blocks go back (its full ones stay
in the prefix cache) and it waits, ahead of every new request, to compute all its tokens again.
With ``chunked_prefill``, while sequences decode, a prompt longer than what is left of the budget
runs as chunks over several steps, so that a long prompt never stalls the running sequences for
longer than one budget's worth of tokens. Otherwise
prompts run whole, packed up to a budget of at least ``max_model_len`` beside the decodes (as vLLM
requires without chunking): a step that decodes nothing has no stream to keep at pace, and a
prompt in one piece prefills fastest (causal attention, the weights read once). LongRoPE prompts
that reach the pretrained length always run whole (``whole_prompts_from``).

A request that asks for its prompt's log-probabilities is scored first, in a plan of its own
(``messages.score``: every position's logits, without the cache), before it waits for blocks:
up to a step's token budget of such plans (at least one) come before each model step. One that
asks for no new token (``max_new_tokens=0``) ends there. A prompt's last chunk yields its first
token. A request joins and leaves the running batch at token granularity; its tokens, text and
end are its ``Sequence``'s business, reported through its sink as ``TokenEvent``s. A guided
request's grammar is compiled when it is added (an error ends it there). A request resumed after
tokens it already streamed elsewhere (``Request.emitted``) waits as a preempted sequence.

``add``, ``abort`` and ``stats`` may be called from any thread; ``schedule`` and ``update`` run on one.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from tensorpar.runtime import messages
from tensorpar.runtime.block_manager import BlockManager
from tensorpar.runtime.guided import GuidedCompiler
from tensorpar.runtime.request import Request, Sink, TokenEvent
from tensorpar.runtime.sequence import Sequence, final_event
from tensorpar.runtime.spec import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS

STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # vLLM's, for tokens per step

PREFILL, DECODE, SCORE = "prefill", "decode", "score"


@dataclass
class StepPlan:
    """One step, decided: the ``message`` every rank runs, and what its output is for.

    ``kind``: ``DECODE`` (only decode tokens), ``PREFILL`` (prompt tokens, maybe beside decodes)
    or ``SCORE`` (one waiting request's prompt, all positions' logits). ``rows``: per output row of
    a model step, the sequence that takes its token (None: a prompt chunk before the last, whose
    row yields none). ``computed``: each sequence of the step with how many of its tokens are in
    the cache once it ran. ``scoring``: the request a ``SCORE`` plan scores, and its sink. A
    sequence that verifies k drafts (``runtime.speculative``) has k + 1 rows, one per position."""

    kind: str
    message: messages.Message
    rows: list[Sequence | None] = field(default_factory=list)
    computed: list[tuple[Sequence, int]] = field(default_factory=list)
    scoring: tuple[Request, Sink] | None = None
    drafts: dict[str, list[int]] = field(default_factory=dict)  # the drafts each verifying sequence's rows check


def score_plan(request: Request, sink: Sink | None = None) -> StepPlan:
    """A plan that scores ``request``'s prompt (``LLM.score`` runs these too)."""
    return StepPlan(SCORE, messages.score(request.prompt_token_ids), scoring=(request, sink))


class Scheduler:
    """Admission, chunking, preemption and retirement over the KV-cache blocks (module docstring).

    ``whole_prompts_from``: prompts at least this long run whole (``ModelConfig.whole_prompts_from``)."""

    def __init__(self, tokenizer, eos_ids: set[int], max_num_seqs: int, max_model_len: int,
                 max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS, chunked_prefill: bool = True,
                 block_size: int = DEFAULT_BLOCK_SIZE, prefix_caching: bool = True, num_blocks: int | None = None,
                 whole_prompts_from: int | None = None):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.blocks: BlockManager | None = None
        self.num_blocks = num_blocks  # a KV cache of this many blocks (``--kv-cache-memory``), else sized by ``reserve``
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.max_num_batched_tokens, self.chunked_prefill = max_num_batched_tokens, chunked_prefill
        # new tokens of a step that runs whole prompts: any prompt fits beside the decodes
        self.whole_budget = max(max_num_batched_tokens, max_model_len + max_num_seqs)
        self.whole_prompts_from = whole_prompts_from
        self.lock = threading.Condition()
        self.waiting: deque[tuple[Request, Sink]] = deque()
        self.running: dict[str, Sequence] = {}  # in order of admission
        self.preempted: deque[Sequence] = deque()  # oldest first
        self.preemptions = 0
        self.step_tokens = {"counts": [0] * (len(STEP_TOKEN_BUCKETS) + 1), "sum": 0, "count": 0}  # per model step
        self.speculation = {"drafts": 0, "draft_tokens": 0,  # verified so far
                            "accepted_per_pos": []}  # how often the j-th draft of a step was taken
        self.aborts: set[str] = set()
        self.scored: set[str] = set()  # waiting requests whose prompt log-probabilities are sent
        self.score_budget = max_num_batched_tokens  # prompt tokens still to score before the next model step
        self.closed: str | None = None  # why requests are refused, once ``close`` has run
        self.holding = False  # admit and score no new request (new weights wait for the running ones to end)
        self.guided = GuidedCompiler(tokenizer, eos_ids)  # grammars of guided requests (compiled on ``add``)

    # ---- any thread ----------------------------------------------------------------------------

    def add(self, request: Request, sink: Sink) -> None:
        if request.params.guided is not None:
            try:
                self.guided.compile(request.params.guided)  # (kept for the sequence to start from)
            except ValueError as e:
                sink(final_event(request.request_id, "error", str(e)))
                return
        with self.lock:
            if self.closed is not None:
                sink(final_event(request.request_id, "error", self.closed))
                return
            if request.emitted:
                self._resume(request, sink)
            else:
                self.waiting.append((request, sink))
            self.lock.notify()

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.aborts.add(request_id)
            self.lock.notify()

    def stats(self) -> dict:
        with self.lock:
            m = self.blocks
            return {"running": len(self.running), "waiting": len(self.waiting) + len(self.preempted),
                    "kv_cache_usage": m.used / m.capacity if m else 0.0, "kv_blocks": m.capacity if m else 0,
                    "free_blocks": m.available if m else 0, "preemptions": self.preemptions,
                    "block_size": self.block_size, "prefix_caching": self.prefix_caching,
                    "step_tokens": {**self.step_tokens, "counts": list(self.step_tokens["counts"])},
                    "prefix_cache_queries": m.queries if m else 0, "prefix_cache_hits": m.hits if m else 0,
                    **{f"spec_{k}": list(v) if isinstance(v, list) else v for k, v in self.speculation.items()},
                    "spec_accepted_tokens": sum(self.speculation["accepted_per_pos"])}

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until there is something to do (or ``timeout_s`` passes); whether there is."""
        with self.lock:
            if not self.has_work():
                self.lock.wait(timeout_s)
            return self.has_work()

    # ---- the stepping thread -------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.preempted or self.aborts)

    def reserve(self, sequences: int, tokens: int) -> int | None:
        """Room for ``sequences`` sequences of ``tokens`` positions at once (at most
        ``max_num_seqs`` of ``max_model_len``), grown only while nothing runs; or, given
        ``num_blocks``, that many blocks. Returns the number of blocks the ranks' KV cache must
        now have (one more than the sequences' own: block 0 pads), or None when it has room."""
        sequences, tokens = min(sequences, self.max_num_seqs), min(tokens, self.max_model_len)
        blocks = self.num_blocks or sequences * -(-tokens // self.block_size)
        if self.blocks is not None and (self.num_blocks or self.blocks.capacity >= blocks):
            return None
        if self.running or self.preempted:
            raise RuntimeError("the KV cache cannot grow while sequences run")
        blocks = max(blocks, self.blocks.capacity if self.blocks else 0)
        self.blocks = BlockManager(blocks + 1, self.block_size, self.prefix_caching)
        return blocks + 1

    def schedule(self) -> StepPlan | None:
        """Aborts, then the next plan: a waiting request's prompt to score, or one model step of
        decode tokens and prompt tokens within the budget; None when nothing can run now."""
        with self.lock:
            self._apply_aborts()
            scoring = self._next_to_score()
            if scoring is not None:
                self.score_budget -= len(scoring[0].prompt_token_ids)
                return score_plan(*scoring)
            self.score_budget = self.max_num_batched_tokens
            for req, sink in [(r, s) for r, s in self.waiting if self._done_before_start(r)]:
                sink(final_event(req.request_id, "length"))
            self.waiting = deque((r, s) for r, s in self.waiting if not self._done_before_start(r))
            decodes = self._grow([s for s in self.running.values() if s.decoding])
            drafts = {s.request_id: list(s.drafts) for s in decodes  # (drafts without blocks left go unchecked)
                      if s.drafts and self.blocks.grow(s.blocks, s.length + len(s.drafts))}
            chunking = self.chunked_prefill and bool(decodes)  # (chunks keep running streams at pace)
            budget = ((self.max_num_batched_tokens if chunking else self.whole_budget) - len(decodes)
                      - sum(map(len, drafts.values())))
            chunks: list[tuple[Sequence, int, int]] = []  # (sequence, first token to compute, last + 1)
            for seq in [s for s in self.running.values() if not s.decoding]:  # prompts begun in earlier steps
                budget = self._take_prompt(seq, budget, chunks, chunking, bool(decodes))
            while budget > 0 or not (decodes or chunks):
                seq = self._admit(budget, chunking, bool(decodes or chunks))
                if seq is None:
                    break
                budget = self._take_prompt(seq, budget, chunks, chunking, bool(decodes))
        if not (decodes or chunks):
            return None
        bs = self.block_size
        plain = [s for s in decodes if s.request_id not in drafts]
        verify = [s for s in decodes if s.request_id in drafts]
        parts = [messages.decode_part([s.last_token for s in plain], [s.length - 1 for s in plain],
                                      [s.blocks for s in plain], bs)] if plain else []
        parts += [messages.chunk(s.tokens + drafts[s.request_id], s.length - 1, s.length + len(drafts[s.request_id]),
                                 s.blocks, bs, outputs=messages.EVERY) for s in verify]
        parts += [messages.chunk(seq.tokens, start, stop, seq.blocks, bs) for seq, start, stop in chunks]
        rows = plain + [s for s in verify for _ in range(len(drafts[s.request_id]) + 1)]
        rows += [seq if stop == seq.length else None for seq, _, stop in chunks]
        message = messages.step(parts, messages.logits_for([s.params for s in rows if s is not None]), self.blocks.fresh)
        computed = [(s, s.computed + 1) for s in decodes] + [(seq, stop) for seq, _, stop in chunks]
        self._count_step(len(decodes) + sum(map(len, drafts.values())) + sum(stop - start for _, start, stop in chunks))
        return StepPlan(PREFILL if chunks else DECODE, message, rows, computed, drafts=drafts)

    def _count_step(self, tokens: int) -> None:
        """A model step of ``tokens`` new tokens, into the step-size histogram (``stats``)."""
        h = self.step_tokens
        h["counts"][bisect.bisect_left(STEP_TOKEN_BUCKETS, tokens)] += 1
        h["sum"] += tokens
        h["count"] += 1

    def update(self, plan: StepPlan, sampled: list) -> int:
        """Apply a plan's outcome: a ``SCORE`` plan's prompt log-probabilities (``sampled``: the
        list ``Sampler.choose`` made) go to its request; a model step's sequences advance to
        what they computed, their full blocks join the prefix cache, and each row's ``Sampled``
        token (or list of them, for drafts verified) is appended (None: no token), retiring the
        sequences that finish. A verifying sequence keeps the cache entries of the drafts it took
        and gives back the blocks it no longer needs. Returns the tokens appended."""
        if plan.kind == SCORE:
            request, sink = plan.scoring
            sink(TokenEvent(request.request_id, None, "", prompt_logprobs=sampled))
            with self.lock:
                self.scored.add(request.request_id)
            return 0
        for seq, computed in plan.computed:
            seq.computed = computed
            self._register(seq)
        appended = 0
        for seq, choice in zip(plan.rows, sampled):
            if seq is None or choice is None:
                continue
            taken = choice if isinstance(choice, list) else [choice]
            for c in taken:
                if seq.guided is not None:
                    seq.guided.accept(c.token)
                seq.append(c.token, c.logprob, c.top)
                appended += 1
                if seq.finish_reason is not None:
                    break
            if seq.request_id in plan.drafts:
                self.speculation["drafts"] += 1
                self.speculation["draft_tokens"] += len(plan.drafts[seq.request_id])
                per_pos = self.speculation["accepted_per_pos"]
                per_pos.extend([0] * (len(plan.drafts[seq.request_id]) - len(per_pos)))
                for j in range(len(taken) - 1):  # (the j-th draft of a step was taken)
                    per_pos[j] += 1
                if seq.finish_reason is None:
                    seq.computed = seq.length - 1  # (the last token's entry is written by the next step)
                    self._register(seq)
                    self.blocks.trim(seq.blocks, seq.length)
            if seq.finish_reason is not None:
                with self.lock:
                    self._retire(seq, seq.finish_reason)
        return appended

    def _register(self, seq: Sequence) -> None:
        """Name ``seq``'s blocks that its computed positions have filled (the prefix cache)."""
        if self.prefix_caching and seq.computed // self.block_size > len(seq.hashes):
            self.blocks.register(seq.blocks, seq.hashes, seq.tokens, seq.computed, seq.cache_root)

    def close(self, reason: str, error: str | None = None) -> None:
        """End every request, running or waiting, and refuse new ones (shutdown, or a failure no
        step can survive)."""
        with self.lock:
            self.closed = error or "the engine is shut down"
            for seq in list(self.running.values()):
                self._retire(seq, reason, error)
            for seq in self.preempted:
                seq.end(reason, error)
            self.preempted.clear()
            for req, sink in self.waiting:
                sink(final_event(req.request_id, reason, error))
            self.waiting.clear()

    # ---- inside ``schedule`` (lock held) ------------------------------------------------------

    def _apply_aborts(self) -> None:
        aborts, self.aborts = self.aborts, set()
        for req, sink in [(r, s) for r, s in self.waiting if r.request_id in aborts]:
            sink(final_event(req.request_id, "abort"))
        self.waiting = deque((r, s) for r, s in self.waiting if r.request_id not in aborts)
        self.scored &= {r.request_id for r, _ in self.waiting}
        for rid in aborts:
            if rid in self.running:
                self._retire(self.running[rid], "abort")
        for seq in [s for s in self.preempted if s.request_id in aborts]:
            self.preempted.remove(seq)
            seq.end("abort")

    def _resume(self, request: Request, sink: Sink) -> None:
        """A request resumed after its ``emitted`` tokens waits as a preempted sequence does (ahead
        of new requests), to compute them again; ends at once when they ended it."""
        seq = Sequence(request, sink, self.tokenizer, self.eos_ids, self.max_model_len)
        if request.params.guided is not None:
            seq.guided = self.guided.start(request.params.guided)
        seq.replay(request.emitted)
        if seq.finish_reason is not None:
            seq.end(seq.finish_reason)
        else:
            self.preempted.append(seq)

    def _next_to_score(self) -> tuple[Request, Sink] | None:
        """The oldest waiting request whose prompt log-probabilities are still to send, while the
        scoring budget before the next model step lasts (one is always let through)."""
        if self.score_budget <= 0 or self.holding:
            return None
        for req, sink in self.waiting:
            if req.params.prompt_logprobs is not None and req.request_id not in self.scored:
                return req, sink
        return None

    def _grow(self, decodes: list[Sequence]) -> list[Sequence]:
        """Give each decoding sequence, oldest first, the block its next token needs, preempting
        the newest running sequences while none is left; the decoding sequences still running."""
        for seq in decodes:
            while seq.request_id in self.running and not self.blocks.grow(seq.blocks, seq.length):
                self._preempt(next(reversed(self.running.values())))
        return [s for s in decodes if s.request_id in self.running]

    def _preempt(self, seq: Sequence) -> None:
        """Take ``seq``'s blocks back; it waits, first in line, to compute its tokens again."""
        del self.running[seq.request_id]
        self.blocks.release(seq.blocks)
        seq.hashes, seq.computed = [], 0
        self.preempted.appendleft(seq)
        self.preemptions += 1

    def _admit(self, budget: int, chunking: bool, busy: bool) -> Sequence | None:
        """The next sequence to start (a preempted one first, else the oldest waiting request) with
        its blocks, cached prefix included; None when there is none, or it has to wait: for a free
        sequence, for blocks, for a step with room for its whole prompt, or to be scored first."""
        if len(self.running) >= self.max_num_seqs or not (self.preempted or (self.waiting and not self.holding)):
            return None
        if self.preempted:
            seq, tokens = self.preempted[0], self.preempted[0].tokens
        else:
            req, sink = self.waiting[0]
            seq, tokens = None, req.prompt_token_ids
            if req.params.prompt_logprobs is not None and req.request_id not in self.scored:
                return None  # scored by a plan of its own first
        if not chunking and len(tokens) > budget and busy:
            return None  # a whole prompt waits for a step with room for it
        # LongRoPE: a prompt that reaches the pretrained length rotates all its keys by the long
        # factors, so it shares blocks only with prompts that do too
        root = "long" if self.whole_prompts_from is not None and len(tokens) >= self.whole_prompts_from else None
        got = self.blocks.admit(tokens, root)
        if got is None:
            return None
        if seq is None:
            self.waiting.popleft()
            self.scored.discard(req.request_id)
            seq = Sequence(req, sink, self.tokenizer, self.eos_ids, self.max_model_len)
            if req.params.guided is not None:
                seq.guided = self.guided.start(req.params.guided)
        else:
            self.preempted.popleft()
        seq.blocks, seq.hashes = got
        seq.cache_root, seq.computed = root, len(seq.hashes) * self.block_size
        if seq.cached_tokens is None:  # (first admission: what a preempted one finds again is not reported)
            seq.cached_tokens, seq.admitted_at = seq.computed, time.perf_counter()
        self.running[seq.request_id] = seq
        return seq

    def _done_before_start(self, req: Request) -> bool:
        """Generates nothing, and has had its prompt scored if it asked for that."""
        return req.params.max_new_tokens == 0 and (req.params.prompt_logprobs is None or req.request_id in self.scored)

    def _take_prompt(self, seq: Sequence, budget: int, chunks: list, chunking: bool, decoding: bool) -> int:
        """Schedule what of ``seq``'s prompt fits in ``budget`` (all of it when not chunking, where
        the step has room or nothing else to run); the budget left."""
        prompt = seq.length
        left = prompt - seq.computed
        chunked = chunking and (self.whole_prompts_from is None or prompt < self.whole_prompts_from)
        take = min(left, budget) if chunked else left
        if take <= 0 or (not chunked and left > budget and (decoding or chunks)):
            return budget
        chunks.append((seq, seq.computed, seq.computed + take))
        return budget - take

    def _retire(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Give ``seq``'s blocks back and send its final event (lock held)."""
        if self.running.pop(seq.request_id, None) is None:
            return
        self.blocks.release(seq.blocks)
        seq.end(reason, error)
