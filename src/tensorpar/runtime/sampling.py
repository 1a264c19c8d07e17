"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

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
    ``prompt_logprobs``: a scoring request).
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
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

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
    """One token id from one row of logits [vocab].

    Sampling draws from softmax(logits / T) restricted to the ``top_k`` largest logits and to the
    smallest set of tokens whose probability mass reaches ``top_p``.
    """
    import torch

    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # mass before this token already reaches p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
