"""Choosing the next token from logits: the controls that reshape a batch's logits
(``apply_controls``: logit bias, repetition / presence / frequency penalties, a minimum length),
then greedy, or temperature / top-k / top-p / min-p sampling (``sample``). A guided sequence's
grammar (``SamplingParams.guided``) masks its row on top (``tensorpar.runtime.guided``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from tensorpar.runtime.guided import GuidedDecoding

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to generate from one prompt. ``temperature=0`` is greedy (the default).

    ``n`` completions are generated, choice i sampling with ``seed + i`` when a seed is given.
    ``logprobs``: how many of the most likely tokens to report with each generated one (the
    chosen token's own log-probability is always reported). ``prompt_logprobs``: when set, each
    prompt token's log-probability given the tokens before it, with that many of the most likely
    tokens at its position (the first token has none). ``max_new_tokens=0`` generates nothing (with
    ``prompt_logprobs``: a scoring request). ``guided``: a constraint the output must meet (a JSON
    schema, a regex, ...: ``GuidedDecoding``). ``allowed_token_ids``: when given, the only tokens
    that may be generated; ``bad_words``: token sequences never completed (a sequence's last token
    is barred wherever the output ends with the rest of it; vLLM's ``bad_words``, tokenized).
    ``include_stop_str_in_output``: the text keeps the stop string that ended it.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int = 0
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    guided: GuidedDecoding | None = None
    allowed_token_ids: tuple[int, ...] = ()
    bad_words: tuple[tuple[int, ...], ...] = ()
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int) or self.prompt_logprobs < 0):
            raise ValueError(f"prompt_logprobs must be a non-negative integer, got {self.prompt_logprobs!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")
        if not isinstance(self.logprobs, int) or self.logprobs < 0:
            raise ValueError(f"logprobs must be a non-negative integer, got {self.logprobs!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= max(self.max_new_tokens, 0):
            raise ValueError(f"min_tokens must be from 0 to max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.min_tokens!r}")
        if self.guided is not None and not isinstance(self.guided, GuidedDecoding):
            raise ValueError(f"guided must be a GuidedDecoding or None, got {type(self.guided).__name__}")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in dict(self.logit_bias).items()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "allowed_token_ids", tuple(int(t) for t in self.allowed_token_ids))
        object.__setattr__(self, "bad_words", tuple(tuple(int(t) for t in w) for w in self.bad_words if w))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def controls_logits(self) -> bool:
        """Some control reshapes the logits before the choice (``apply_controls``, or a grammar)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty or self.min_tokens
                    or self.repetition_penalty != 1.0 or self.guided is not None or self.allowed_token_ids
                    or self.bad_words)

    def choices(self) -> list["SamplingParams"]:
        """One ``n=1`` copy per choice; choice i samples with ``seed + i`` when a seed is given."""
        return [replace(self, n=1, seed=None if self.seed is None else self.seed + i) for i in range(self.n)]

    def generator(self) -> "torch.Generator | None":
        """The random stream of one choice: seeded, or from fresh entropy; None when greedy."""
        if self.greedy:
            return None
        import torch

        return torch.Generator().manual_seed(self.seed if self.seed is not None else int(torch.seed() % 2**63))


def sample(logits: "torch.Tensor", params: SamplingParams, generator: "torch.Generator | None") -> int:
    """One token id from one row of logits [vocab]: the argmax when greedy, else a draw from
    ``probabilities(logits, params)``."""
    import torch

    if params.greedy:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probabilities(logits, params), 1, generator=generator))


def probabilities(logits: "torch.Tensor", params: SamplingParams) -> "torch.Tensor":
    """The distribution [vocab] a sampled token is drawn from: softmax(logits / T) restricted to
    tokens of probability at least ``min_p`` times the largest, to the ``top_k`` largest logits and
    to the smallest set of tokens whose probability mass reaches ``top_p``."""
    import torch

    logits = logits.float() / params.temperature
    if params.min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # mass before this token already reaches p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def accept_drafts(drafts: list[int], target: "torch.Tensor", proposal: "torch.Tensor | None",
                  generator: "torch.Generator") -> list[int]:
    """Speculative sampling (Leviathan et al., 2023; Chen et al., 2023): the tokens a sampled
    sequence takes from ``k`` drafts. ``target`` [k + 1, vocab]: the target's distribution at each
    draft's position and one past; ``proposal`` [k, vocab]: the distributions the drafts were drawn
    from (None: each draft was certain, an n-gram's). Draft x_i is kept with probability
    min(1, p_i(x_i) / q_i(x_i)); the first one rejected is replaced by a draw from
    norm(max(0, p_i - q_i)); when all are kept, one more is drawn from p_k. The tokens taken are
    then distributed as the target's own, whatever the drafts."""
    import torch

    out = []
    for i, x in enumerate(drafts):
        p = target[i]
        q = torch.zeros_like(p) if proposal is None else proposal[i]
        if proposal is None:
            q[x] = 1.0
        if float(torch.rand(1, generator=generator)) * float(q[x]) < float(p[x]):
            out.append(x)
            continue
        residual = (p - q).clamp_(min=0)
        total = float(residual.sum())
        out.append(int(torch.multinomial(residual / total if total > 0 else p, 1, generator=generator)))
        return out
    return out + [int(torch.multinomial(target[len(drafts)], 1, generator=generator))]


def apply_controls(logits: "torch.Tensor", params: list[SamplingParams], prompts: list[list[int]],
                   outputs: list[list[int]], eos_ids: list[set[int]]) -> "torch.Tensor":
    """``logits`` [B, vocab] reshaped by each row's controls (``SamplingParams``), all rows at once:

        l'[t] = l[t] + bias[t]
        l'[t] = l'[t] / r if l'[t] > 0 else l'[t] * r        for t in prompt or output (r: repetition)
        l'[t] = l'[t] - presence * [count[t] > 0] - frequency * count[t]   (count: in the output)
        l'[t] = -inf for t outside ``allowed_token_ids`` (when given)
        l'[t] = -inf for t the last token of a bad word whose other tokens end the output
        l'[t] = -inf for an EOS or stop token t while fewer than ``min_tokens`` are generated

    ``eos_ids[b]``: the end-of-sequence tokens that end row b (none with ``ignore_eos``). Rows
    without controls are unchanged.
    """
    import torch

    rows = [b for b, p in enumerate(params) if p.controls_logits]
    if not rows:
        return logits
    logits = logits.float().clone()
    B, V = len(rows), logits.shape[-1]
    sub = logits[rows]  # [B, V]
    f32 = dict(dtype=torch.float32)
    bias = torch.zeros(B, V, **f32)
    for i, b in enumerate(rows):
        for t, v in params[b].logit_bias:
            if 0 <= t < V:
                bias[i, t] += v
    sub += bias
    # token counts of each row's output [B, V], and which tokens its prompt or output holds
    longest = max(1, *(len(outputs[b]) for b in rows))
    ids = torch.zeros(B, longest, dtype=torch.long)
    mask = torch.zeros(B, longest, **f32)
    for i, b in enumerate(rows):
        ids[i, : len(outputs[b])] = torch.tensor(outputs[b], dtype=torch.long)
        mask[i, : len(outputs[b])] = 1
    counts = torch.zeros(B, V, **f32).scatter_add_(1, ids, mask)
    r = torch.tensor([params[b].repetition_penalty for b in rows], **f32)[:, None]
    if (r != 1).any():
        seen = counts > 0
        for i, b in enumerate(rows):
            seen[i, torch.tensor(prompts[b], dtype=torch.long)] = True
        sub = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
    presence = torch.tensor([params[b].presence_penalty for b in rows], **f32)[:, None]
    frequency = torch.tensor([params[b].frequency_penalty for b in rows], **f32)[:, None]
    sub = sub - presence * (counts > 0) - frequency * counts
    for i, b in enumerate(rows):
        p, out = params[b], outputs[b]
        if p.allowed_token_ids:
            keep = torch.full((V,), float("-inf"))
            keep[torch.tensor([t for t in p.allowed_token_ids if 0 <= t < V], dtype=torch.long)] = 0.0
            sub[i] += keep
        for word in p.bad_words:  # its last token, where the output ends with the rest of it
            if 0 <= word[-1] < V and (len(word) == 1 or tuple(out[-(len(word) - 1):]) == word[:-1]):
                sub[i, word[-1]] = float("-inf")
        held = {t for t in eos_ids[b] | set(params[b].stop_token_ids) if 0 <= t < V}
        if len(outputs[b]) < params[b].min_tokens and held:
            sub[i, torch.tensor(sorted(held), dtype=torch.long)] = float("-inf")
    logits[rows] = sub
    return logits
