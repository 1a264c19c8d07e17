"""The prompts every contender gets: token-id lists, so that tensorpar and the peers run exactly
the same tokens and no tokenizer (or padding) is involved."""

from __future__ import annotations

import torch

SHORT_PROMPT_TOKENS = 16


def _ids(vocab_size: int, n: int, seed: int) -> list[int]:
    # Stay clear of the low ids, where vocabularies keep their special tokens.
    low = min(256, vocab_size // 2)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (n,), generator=g).tolist()


def batch_prompts(vocab_size: int, batch: int, length: int = SHORT_PROMPT_TOKENS) -> list[list[int]]:
    """``batch`` different prompts of ``length`` token ids each (deterministic)."""
    return [_ids(vocab_size, length, seed=1000 + i) for i in range(batch)]


def long_prompt(vocab_size: int, length: int) -> list[int]:
    """One prompt of ``length`` token ids (deterministic), for prefill throughput."""
    return _ids(vocab_size, length, seed=7)


def fit_context(max_positions: int, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """(prompt_len, new_tokens) cut down to fit the model's context where they do not."""
    return min(prompt_len, max_positions - 1), min(new_tokens, max_positions - SHORT_PROMPT_TOKENS)
