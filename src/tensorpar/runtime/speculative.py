"""Speculative decoding: propose a few tokens cheaply, verify them all in one target step.

A decode step reads every weight once whether it computes one position or five. A *proposer*
guesses the next ``k`` tokens of each decoding sequence (``Sequence.drafts``); the next target
step computes the sequence's last token and its k drafts as one part of k + 1 positions whose
every logits come back (``messages.EVERY``), packed beside the other sequences' decodes and
prompts (``Scheduler.schedule``). ``Sampler.choose`` keeps the longest prefix the target agrees
with and adds one token of the target's own (``sampling.accept_drafts``): a step yields 1 to
k + 1 tokens, and the output is the target's (greedy: the same tokens; sampled: the same
distribution). The KV entries of rejected drafts are overwritten later; their blocks go back.

Two proposers, configured as vLLM's ``--speculative-config`` spells it:

- ``ngram`` (prompt lookup): the longest suffix of the sequence, from ``prompt_lookup_max`` down to
  ``prompt_lookup_min`` tokens, that occurred before; the tokens that followed its latest earlier
  occurrence are the drafts. Free, and right where an answer copies its prompt.
- a draft ``model`` with the target's vocabulary, at its own degree
  (``draft_tensor_parallel_size``): the first d ranks of the target's group hold its shards
  beside their own (``ModelRunner.attach_draft``); its messages travel on the same control channel
  (``messages.DRAFT``), so the target's other ranks wait while it runs, as they would for any
  step. Its KV cache keeps every sequence's tokens as far as they agree with the draft's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tensorpar.errors import TensorparError

METHODS = ("ngram", "draft_model")
KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
        "draft_tensor_parallel_size", "disable_by_batch_size")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """``method``: ``ngram`` or ``draft_model``; ``num_speculative_tokens``: k, the drafts per step;
    ``prompt_lookup_min/max``: the n-gram sizes looked up; ``model``: the draft's checkpoint;
    ``draft_tensor_parallel_size``: its degree (default: the target's, as in vLLM);
    ``disable_by_batch_size``: no drafts for a step while more sequences than this decode (a batch
    that large makes the target's products compute-bound, where verifying k + 1 positions costs
    k + 1 times one)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 0
    prompt_lookup_min: int = 0
    model: str | None = None
    draft_tensor_parallel_size: int | None = None
    disable_by_batch_size: int | None = None

    @classmethod
    def parse(cls, given: "str | dict | SpeculativeConfig | None") -> "SpeculativeConfig | None":
        """vLLM's ``--speculative-config``: a JSON object (as text or a dict); None when not given."""
        if given is None or isinstance(given, SpeculativeConfig):
            return given
        if isinstance(given, str):
            try:
                given = json.loads(given)
            except ValueError as e:
                raise TensorparError(f"--speculative-config must be a JSON object: {e}") from None
        if not isinstance(given, dict):
            raise TensorparError(f"--speculative-config must be a JSON object, got {type(given).__name__}")
        unknown = sorted(set(given) - set(KEYS))
        if unknown:
            raise TensorparError(f"--speculative-config: unknown key(s) {', '.join(unknown)}; the keys are "
                                 f"{', '.join(KEYS)}")
        model = given.get("model")
        method = given.get("method") or ("ngram" if model in ("ngram", "[ngram]") else "draft_model" if model else None)
        if method == "draft_model" and model in (None, "ngram", "[ngram]"):
            raise TensorparError("--speculative-config: method draft_model needs \"model\": the draft's checkpoint")
        if method not in METHODS:
            raise TensorparError(f"--speculative-config: method {method!r} is not supported; give \"ngram\", or a "
                                 "draft \"model\" (method \"draft_model\")")
        k = given.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise TensorparError(f"--speculative-config: num_speculative_tokens must be an integer from 1 to "
                                 f"{MAX_SPECULATIVE_TOKENS}, got {k!r}")
        lo, hi = given.get("prompt_lookup_min"), given.get("prompt_lookup_max")
        if method == "ngram":  # (vLLM's defaults: one given sets the other; none, 5)
            lo, hi = (lo or hi or 5), (hi or lo or 5)
            if not all(isinstance(v, int) and v >= 1 for v in (lo, hi)) or lo > hi:
                raise TensorparError(f"--speculative-config: prompt_lookup_min ({lo}) and prompt_lookup_max ({hi}) "
                                     "must be integers with 1 <= min <= max")
        elif lo is not None or hi is not None:
            raise TensorparError("--speculative-config: prompt_lookup_min/max are for method ngram")
        degree = given.get("draft_tensor_parallel_size")
        if degree is not None and (method != "draft_model" or not isinstance(degree, int) or degree < 1):
            raise TensorparError(f"--speculative-config: draft_tensor_parallel_size must be a positive integer, "
                                 f"and is for a draft model; got {degree!r}")
        limit = given.get("disable_by_batch_size")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise TensorparError(f"--speculative-config: disable_by_batch_size must be a positive integer, got {limit!r}")
        return cls(method, k, hi or 0, lo or 0, model if method == "draft_model" else None, degree, limit)

    def describe(self) -> str:
        if self.method == "ngram":
            return f"ngram k={self.num_speculative_tokens} n={self.prompt_lookup_min}..{self.prompt_lookup_max}"
        return f"draft {self.model} k={self.num_speculative_tokens}"


def room_for_drafts(seq, k: int) -> int:
    """How many drafts ``seq`` can use: k, fewer near its token or context limit (the step adds a
    token of its own)."""
    left = min(seq.params.max_new_tokens - len(seq.out), seq.max_model_len - seq.length)
    return max(0, min(k, left - 1))


def ngram_drafts(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix of
    ``tokens`` of ``hi`` down to ``lo`` tokens; [] when none occurred. One vectorized pass finds
    where the last token occurred before; each longer suffix keeps the places that still match."""
    import numpy as np

    n_tokens = len(tokens)
    ids = np.asarray(tokens)
    ends = np.flatnonzero(ids[:-1] == ids[-1])  # where earlier occurrences of the 1-token suffix end
    best = ends if lo <= 1 else ends[:0]
    for n in range(2, min(hi, n_tokens - 1) + 1):
        ends = ends[ends >= n - 1]
        ends = ends[ids[ends - (n - 1)] == ids[n_tokens - n]]
        if not ends.size:
            break
        if n >= lo:
            best = ends
    if not best.size:
        return []
    end = int(best[-1])
    return tokens[end + 1 : end + 1 + k]


class Proposer:
    """Sets ``seq.drafts`` of decoding sequences after each step (``EngineCore.step``)."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def allocate(self, num_blocks: int, block_size: int) -> None:
        """A KV cache of ``num_blocks`` blocks, where the proposer has a model."""

    def propose_for(self, seqs: list, alive: set[str]) -> None:
        """Drafts for ``seqs`` (the decoding sequences), none while they are more than
        ``disable_by_batch_size``; ``alive``: every sequence still running or waiting to resume."""
        limit = self.config.disable_by_batch_size
        if limit is not None and len(seqs) > limit:
            for seq in seqs:
                seq.drafts, seq.draft_probs = [], None
            seqs = []
        self.propose(seqs, alive)

    def propose(self, seqs: list, alive: set[str]) -> None:
        raise NotImplementedError


class NgramProposer(Proposer):
    def propose(self, seqs: list, alive: set[str]) -> None:
        c = self.config
        for seq in seqs:
            k = room_for_drafts(seq, c.num_speculative_tokens)
            drafts = ngram_drafts(seq.tokens, c.prompt_lookup_min, c.prompt_lookup_max, k) if k else []
            if seq.guided is not None:  # (as far as its grammar allows them)
                drafts = drafts[: seq.guided.valid_prefix(drafts)]
            seq.drafts, seq.draft_probs = drafts, None  # (a point mass on each draft)


def speculation_summary(counts: dict) -> dict:
    """vLLM's figures from the counts of drafts verified (``Scheduler.speculation``): the
    ``acceptance_rate`` (drafts taken over drafts proposed) and the ``mean_acceptance_length``
    (tokens a verifying step yields: the drafts taken, plus the target's own); and how often the
    j-th draft of a step was taken (``accepted_per_position``, vLLM's ``..._per_pos``)."""
    drafts, proposed, taken = (counts.get(f"spec_{k}", 0) for k in ("drafts", "draft_tokens", "accepted_tokens"))
    return {"drafts": drafts, "draft_tokens": proposed, "accepted_tokens": taken,
            "acceptance_rate": taken / proposed if proposed else 0.0,
            "mean_acceptance_length": 1 + taken / drafts if drafts else 0.0,
            "accepted_per_position": list(counts.get("spec_accepted_per_pos", []))}


def proposer_for(spec, runner, eos_ids: set[int]):
    """The proposer ``spec.speculative`` configures, on the leader (None elsewhere). A draft model
    is attached to ``runner`` on every rank first (collective)."""
    config = spec.speculative
    if config.method == "draft_model":
        runner.attach_draft(spec.draft)
    if not runner.ctx.is_leader:
        return None
    return NgramProposer(config) if config.method == "ngram" else DraftProposer(config, runner, eos_ids)


@dataclass
class _DraftCache:
    """One sequence's entries in the draft model's KV cache: its block ``table``; ``good`` of its
    tokens are there for sure, then the drafts ``fed`` after them (kept as far as the sequence took them)."""

    table: list
    good: int = 0
    fed: tuple = ()


class DraftProposer(Proposer):
    """Drafts from a small model (module docstring): per step, one draft-model step over every
    sequence's tokens not yet in the draft's cache (at least its last), then k - 1 decode steps,
    each drawing a draft as the target would (its controls, then greedy or sampled: ``draft_probs``
    keeps the distributions for ``sampling.accept_drafts``)."""

    def __init__(self, config: SpeculativeConfig, runner, eos_ids: set[int]):
        super().__init__(config)
        self.runner, self.eos_ids = runner, eos_ids
        self.blocks = None
        self.caches: dict[str, _DraftCache] = {}

    def allocate(self, num_blocks: int, block_size: int) -> None:
        from tensorpar.runtime import messages
        from tensorpar.runtime.block_manager import BlockManager

        self.runner.execute(messages.allocate(num_blocks, block_size, model=messages.DRAFT))
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching=False)
        self.caches.clear()

    def propose(self, seqs: list, alive: set[str]) -> None:
        from tensorpar.runtime import messages

        for rid in [r for r in self.caches if r not in alive]:
            self.blocks.release(self.caches.pop(rid).table)
        work = []  # (sequence, its draft cache, drafts to make)
        for seq in seqs:
            seq.drafts, seq.draft_probs = [], None
            k = room_for_drafts(seq, self.config.num_speculative_tokens)
            cache = self.caches.setdefault(seq.request_id, _DraftCache([]))
            if not k or not self.blocks.grow(cache.table, seq.length + k - 1):
                continue  # (no drafts this step; its cache stays as it is)
            tokens, agree = seq.tokens, 0
            while agree < len(cache.fed) and cache.good + agree < seq.length and cache.fed[agree] == tokens[cache.good + agree]:
                agree += 1
            cache.good, cache.fed = min(cache.good + agree, seq.length - 1), ()
            work.append((seq, cache, k))
        if not work:
            return
        bs = self.blocks.block_size
        one = [w for w in work if w[1].good == w[0].length - 1]  # just its last token to feed
        more = [w for w in work if w[1].good < w[0].length - 1]
        parts = [messages.decode_part([s.last_token for s, _, _ in one], [s.length - 1 for s, _, _ in one],
                                      [c.table for _, c, _ in one], bs)] if one else []
        parts += [messages.chunk(s.tokens, c.good, s.length, c.table, bs) for s, c, _ in more]
        work = one + more
        for seq, cache, _ in work:
            cache.good = seq.length
        self._draw(work, parts)
        for step in range(1, max(k for _, _, k in work)):
            work = [w for w in work if w[2] > step]
            positions = [s.length + step - 1 for s, _, _ in work]
            self._draw(work, [messages.decode_part([s.drafts[-1] for s, _, _ in work], positions,
                                                   [c.table for _, c, _ in work], bs)])
            for seq, cache, _ in work:
                cache.fed += (seq.drafts[-2],)

    def _draw(self, work: list, parts: list) -> None:
        """Run one draft step of ``parts`` (a row per sequence of ``work``, in order) and add each
        sequence's next draft."""
        import torch

        from tensorpar.runtime import messages
        from tensorpar.runtime.sampling import apply_controls, probabilities

        seqs = [s for s, _, _ in work]
        mode = messages.logits_for([s.params for s in seqs])
        out = self.runner.execute(messages.step(parts, mode, self.blocks.fresh, model=messages.DRAFT))
        if mode == messages.GREEDY:
            for seq, token in zip(seqs, out.ids.tolist()):
                seq.drafts.append(token)
            return
        logits = apply_controls(out.logits.float(), [s.params for s in seqs], [s.request.prompt_token_ids for s in seqs],
                                [s.out + s.drafts for s in seqs],
                                [set() if s.params.ignore_eos else self.eos_ids for s in seqs])
        for seq, row in zip(seqs, logits):
            if seq.guided is not None:  # its grammar after the drafts so far has the last word
                with seq.guided.ahead(seq.drafts) as grammar:
                    grammar.mask_(row)
            if seq.params.greedy:
                seq.drafts.append(int(row.argmax()))
                continue
            q = probabilities(row, seq.params)
            seq.drafts.append(int(torch.multinomial(q, 1, generator=seq.generator)))
            seq.draft_probs = q[None] if seq.draft_probs is None else torch.cat([seq.draft_probs, q[None]])
