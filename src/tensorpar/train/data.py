"""Training data: a text file tokenized once, and the batch of each step.

The batch of step ``s`` depends only on (seed, s): ``batch`` windows of ``seq_len + 1`` tokens at
offsets drawn from a generator seeded with both. Runs at any TP/DP degree, and runs resumed from
a checkpoint, therefore see the same batches; data-parallel replica ``d`` of ``dp`` takes rows
``[d * batch / dp, (d + 1) * batch / dp)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tensorpar.errors import TensorparError

IGNORE_INDEX = -100


def tokenize_file(path: str | Path, tokenizer) -> torch.Tensor:
    """All tokens of a UTF-8 text file, [N] int64 (no special tokens added)."""
    path = Path(path)
    if not path.is_file():
        raise TensorparError(f"training data {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TensorparError(f"cannot read training data {path}: {e}") from e
    if not text.strip():
        raise TensorparError(f"training data {path} is empty")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def check_data(tokens: torch.Tensor, seq_len: int, vocab_size: int, path: str | Path = "data") -> None:
    """Enough tokens for one window, every one of them inside the model's vocabulary."""
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise TensorparError(
            f"{path}: token id {int(tokens.max())} is outside the model's vocabulary of {vocab_size} "
            f"(the tokenizer does not match the model)"
        )
    if tokens.numel() < seq_len + 1:
        raise TensorparError(
            f"{path} holds {tokens.numel()} tokens, fewer than --seq-len + 1 = {seq_len + 1}: "
            f"give more text or a shorter --seq-len"
        )


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step`` (1-based): a function of (seed, step) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def batch_for_step(tokens: torch.Tensor, seed: int, step: int, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token labels of step ``step``: two [batch, seq_len] int64 tensors."""
    starts = torch.randint(0, tokens.numel() - seq_len, (batch,), generator=step_generator(seed, step))
    windows = tokens[starts.unsqueeze(1) + torch.arange(seq_len + 1)]  # [batch, seq_len + 1]
    return windows[:, :-1], windows[:, 1:]


def replica_rows(batch: int, dp: int, dp_rank: int) -> slice:
    """The rows of the global batch that data-parallel replica ``dp_rank`` trains on."""
    if batch % dp:
        raise TensorparError(f"--batch {batch} must be a multiple of --dp {dp} (each replica takes batch / dp rows)")
    n = batch // dp
    return slice(dp_rank * n, (dp_rank + 1) * n)


def pad_sequence(inputs: torch.Tensor, labels: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [B, S] to a sequence length divisible by ``multiple`` (sequence parallelism splits it
    evenly). Padding goes at the end: under causal attention no real token attends to it, and its
    labels are ``IGNORE_INDEX``, so the loss and every gradient are unchanged."""
    extra = -inputs.shape[1] % multiple
    if not extra:
        return inputs, labels
    pad = (0, extra)
    return torch.nn.functional.pad(inputs, pad, value=0), torch.nn.functional.pad(labels, pad, value=IGNORE_INDEX)
