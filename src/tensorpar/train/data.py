"""Training data, read once, and the batch of each step.

- A text file is one stream of tokens; the batch of step ``s`` is ``batch`` windows of
  ``seq_len + 1`` tokens at offsets drawn from a generator seeded with (seed, s).
- A JSONL file (``.jsonl``) is a list of examples, one per line: ``{"text": ...}`` (every token
  learned, the end-of-sequence token appended), or ``{"messages": [{"role", "content"}, ...]}``
  rendered with the model's chat template, the loss on the assistant's turns only (each turn's
  tokens are those its rendering adds after the prompt that opens it). Each example is one row of
  ``seq_len + 1`` tokens, cut or padded (padding learns nothing: ``IGNORE_INDEX``), or with
  ``pack`` rows hold several whole examples (``pack_rows``), attention staying within each; the
  batch of step ``s`` is ``batch`` rows drawn with the same generator (``Examples``).

Either way a step's batch depends only on (seed, s): runs at any TP/DP degree, and runs resumed
from a checkpoint, see the same batches; data-parallel replica ``d`` of ``dp`` takes rows
``[d * batch / dp, (d + 1) * batch / dp)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


@dataclass
class Examples:
    """Fine-tuning examples as rows: ``ids`` [N, seq_len + 1], and ``targets`` [N, seq_len + 1],
    the id where a token is learned, else ``IGNORE_INDEX``; packed, ``documents`` [N, seq_len + 1]
    numbers the examples within each row (-1: padding)."""

    ids: torch.Tensor
    targets: torch.Tensor
    documents: torch.Tensor | None = None

    def batch(self, seed: int, step: int, batch: int) -> tuple[torch.Tensor, ...]:
        """(inputs, labels), and each input's document when packed: [batch, seq_len] each."""
        rows = torch.randint(0, self.ids.shape[0], (batch,), generator=step_generator(seed, step))
        return self.rows(rows)

    def rows(self, rows) -> tuple[torch.Tensor, ...]:
        out = (self.ids[rows, :-1], self.targets[rows, 1:])
        return out if self.documents is None else (*out, self.documents[rows, :-1])

    def stacked(self) -> torch.Tensor:
        """[2 or 3, N, seq_len + 1]: one tensor to broadcast (``from_stacked`` reads it back)."""
        return torch.stack([self.ids, self.targets] + ([] if self.documents is None else [self.documents]))

    @classmethod
    def from_stacked(cls, t: torch.Tensor) -> "Examples":
        return cls(t[0], t[1], t[2] if t.shape[0] > 2 else None)

    @property
    def learned(self) -> int:
        """Tokens with a loss, in all rows (a row's first token is no row's label)."""
        return int((self.targets[:, 1:] != IGNORE_INDEX).sum())


def read_examples(path: str | Path, tokenizer, seq_len: int, eos_id: int | None, pack: bool = False) -> Examples:
    """The examples of a JSONL file (module docstring), each cut to ``seq_len + 1`` tokens, then
    padded one to a row or packed (``pack_rows``)."""
    examples = []
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise TensorparError(f"training data {path} is empty")
    for n, line in lines:
        try:
            example = json.loads(line)
        except ValueError as e:
            raise TensorparError(f"{path}:{n}: not JSON ({e})") from None
        if isinstance(example, dict) and isinstance(example.get("text"), str):
            ids = tokenizer(example["text"], add_special_tokens=False)["input_ids"] + ([eos_id] if eos_id is not None else [])
            mask = [True] * len(ids)
        elif isinstance(example, dict) and isinstance(example.get("messages"), list):
            ids, mask = _chat(example["messages"], tokenizer, f"{path}:{n}")
        else:
            raise TensorparError(f"{path}:{n}: each line must be an object with \"text\" (a string) or \"messages\" "
                                 "(a list of {\"role\", \"content\"})")
        ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
        examples.append((ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, mask)]))
    if pack:
        examples = pack_rows(examples, seq_len + 1)
    else:
        width = seq_len + 1
        examples = Examples(torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in examples], dtype=torch.long),
                            torch.tensor([t + [IGNORE_INDEX] * (width - len(t)) for _, t in examples], dtype=torch.long))
    if not (examples.targets[:, 1:] != IGNORE_INDEX).any():
        raise TensorparError(f"{path}: no example has a token to learn within --seq-len {seq_len}")
    return examples


def pack_rows(examples: list[tuple[list[int], list[int]]], width: int) -> Examples:
    """Examples (ids, targets) of at most ``width`` tokens in rows of ``width``: first-fit
    decreasing (the longest first, each into the first row with room), none split. An example's
    first token is never learned (in a row of its own it has nothing before it; packed, what is
    before it is another example)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[list[int]] = []  # example indices per row
    room: list[int] = []
    for i in order:
        n = len(examples[i][0])
        j = next((j for j, left in enumerate(room) if left >= n), None)
        if j is None:
            rows.append([]), room.append(width)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= n
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    documents = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for d, i in enumerate(sorted(members)):  # (in file order within a row)
            e_ids, e_targets = examples[i]
            n = len(e_ids)
            ids[r, at : at + n] = torch.tensor(e_ids)
            targets[r, at + 1 : at + n] = torch.tensor(e_targets[1:], dtype=torch.long)
            documents[r, at : at + n] = d
            at += n
    return Examples(ids, targets, documents)


def _chat(messages: list, tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """A conversation's ids under the chat template, and which of them the assistant's turns add."""
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in messages) or not messages:
        raise TensorparError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} strings")
    if getattr(tokenizer, "chat_template", None) is None:
        raise TensorparError(f"{where}: chat messages need a chat template, and the model's tokenizer has none")

    def render(part: list, opened: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(part, add_generation_prompt=opened, tokenize=True, return_dict=False))

    ids = render(messages, False)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
        if render(messages[: i + 1], False) != ids[:end]:
            raise TensorparError(f"{where}: the chat template does not render a conversation as the sum of its "
                                 "turns, so its assistant tokens cannot be told apart")
        mask[start:end] = [True] * (end - start)
    return ids, mask


EVAL_ROWS = 64  # the most rows an evaluation runs


def split_eval(data: "torch.Tensor | Examples", fraction: float, seq_len: int):
    """(training data, evaluation rows ``(inputs, labels)``): the last ``fraction`` of a token
    stream (cut into windows of ``seq_len + 1`` tokens, one after another) or of the examples, at
    most ``EVAL_ROWS`` rows; the rest trains."""
    if isinstance(data, Examples):
        n = data.ids.shape[0]
        held = min(EVAL_ROWS, max(1, round(n * fraction)))
        if held >= n:
            raise TensorparError(f"--eval-split {fraction} leaves none of the {n} rows of examples to train on")
        docs = data.documents
        kept = Examples(data.ids[: n - held], data.targets[: n - held], None if docs is None else docs[: n - held])
        return kept, data.rows(slice(n - held, n))
    n = data.numel()
    held = max(seq_len + 1, round(n * fraction))
    if n - held < seq_len + 1:
        raise TensorparError(f"--eval-split {fraction} of {n} tokens leaves fewer than --seq-len + 1 to train on")
    tail = data[n - held :]
    windows = min(EVAL_ROWS, (tail.numel() - 1) // seq_len)
    rows = tail[torch.arange(windows)[:, None] * seq_len + torch.arange(seq_len + 1)]  # [windows, seq_len + 1]
    return data[: n - held], (rows[:, :-1], rows[:, 1:])


def replica_rows(batch: int, dp: int, dp_rank: int) -> slice:
    """The rows of the global batch that data-parallel replica ``dp_rank`` trains on."""
    if batch % dp:
        raise TensorparError(f"--batch {batch} must be a multiple of --dp {dp} (each replica takes batch / dp rows)")
    n = batch // dp
    return slice(dp_rank * n, (dp_rank + 1) * n)


def pad_sequence(inputs: torch.Tensor, labels: torch.Tensor, multiple: int, documents: torch.Tensor | None = None):
    """Pad [B, S] to a sequence length divisible by ``multiple`` (sequence parallelism splits it
    evenly): (inputs, labels, documents). Padding goes at the end: under causal attention no real
    token attends to it, and its labels are ``IGNORE_INDEX`` (its document -1), so the loss and
    every gradient are unchanged."""
    extra = -inputs.shape[1] % multiple
    if not extra:
        return inputs, labels, documents
    pad = (0, extra)
    return (torch.nn.functional.pad(inputs, pad, value=0), torch.nn.functional.pad(labels, pad, value=IGNORE_INDEX),
            None if documents is None else torch.nn.functional.pad(documents, pad, value=-1))
