"""The messages the leader broadcasts to every rank, one before each thing all ranks do together.

A message is a fixed header of eight integers, then, for model steps, a payload of token ids,
positions and cache slots. The header says everything a rank needs to know without looking at
tensor values (so no rank, and no model, syncs with the device to find out):

    op, rows, tokens, kv_len, max_position, slot_start, kind, logits

- ``STEP``: ``rows`` sequences of ``tokens`` new tokens each, written into their cache slots;
  each row's last position's logits go to the leader. ``kind`` is the attention pattern
  (``tensorpar.layers.attention``), ``slot_start`` the first slot when the slots are
  consecutive (else -1), ``logits`` how they travel (``FULL`` or ``GREEDY``).
- ``SCORE``: one fresh sequence without the cache; logits of every position go to the leader.
- ``ALLOC``: a KV cache of ``rows`` slots of ``kv_len`` positions.
- ``NOOP``: a keep-alive from an idle leader (followers then know it is alive).
- ``END``: the end of one collective call (``Worker.generate`` / ``score``).
- ``SHUTDOWN``: followers leave their loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensorpar.layers.attention import ALL_KEYS, BY_POSITION, CAUSAL, AttentionBatch

END, STEP, SCORE, ALLOC, NOOP, SHUTDOWN = range(6)
FULL, GREEDY = 0, 1  # the leader gets full-vocabulary logits, or each row's argmax and its log-probability
HEADER_SIZE = 8


@dataclass(frozen=True)
class Message:
    op: int
    ids: tuple[tuple[int, ...], ...] = ()  # [rows][tokens]
    positions: tuple[tuple[int, ...], ...] = ()
    slots: tuple[int, ...] = ()
    kv_len: int = 0
    max_position: int = 0
    slot_start: int = -1
    kind: int = CAUSAL
    logits: int = FULL
    alloc_slots: int = 0

    @property
    def rows(self) -> int:
        return self.alloc_slots if self.op == ALLOC else len(self.ids)

    @property
    def tokens(self) -> int:
        return len(self.ids[0]) if self.ids else 0

    def header(self) -> list[int]:
        return [self.op, self.rows, self.tokens, self.kv_len, self.max_position, self.slot_start, self.kind,
                self.logits]

    def payload(self) -> list[int]:
        """ids, then positions (row-major), then slots."""
        return [t for row in self.ids for t in row] + [p for row in self.positions for p in row] + list(self.slots)

    @staticmethod
    def payload_size(header: list[int]) -> int:
        op, rows, tokens = header[:3]
        if op == STEP:
            return 2 * rows * tokens + rows
        if op == SCORE:
            return 2 * rows * tokens
        return 0


def prefill(prompt: list[int], slot: int, logits: int = FULL) -> Message:
    """A new sequence's whole prompt, from position 0, into cache slot ``slot``."""
    n = len(prompt)
    return Message(STEP, (tuple(prompt),), (tuple(range(n)),), (slot,), kv_len=n, max_position=n - 1,
                   slot_start=slot, kind=CAUSAL, logits=logits)


def decode(tokens: list[int], positions: list[int], slots: list[int], logits: int = FULL) -> Message:
    """One new token for each running sequence, at its next position."""
    kv_len = max(positions) + 1
    consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
    kind = ALL_KEYS if all(p == kv_len - 1 for p in positions) else BY_POSITION
    return Message(STEP, tuple((t,) for t in tokens), tuple((p,) for p in positions), tuple(slots), kv_len=kv_len,
                   max_position=kv_len - 1, slot_start=slots[0] if consecutive else -1, kind=kind, logits=logits)


def score(prompt: list[int]) -> Message:
    n = len(prompt)
    return Message(SCORE, (tuple(prompt),), (tuple(range(n)),), max_position=n - 1, kind=CAUSAL)


def allocate(slots: int, max_len: int) -> Message:
    return Message(ALLOC, kv_len=max_len, alloc_slots=slots)


@dataclass
class Batch:
    """A model step as tensors on this rank's device: input ids [B, S] and what attention needs."""

    op: int
    ids: torch.Tensor | None = None
    attention: AttentionBatch | None = None
    logits: int = FULL
    alloc_slots: int = 0
    kv_len: int = 0


def to_batch(header: list[int], payload: torch.Tensor | None) -> Batch:
    """What every rank runs, from the header and payload it received (the leader: that it sent)."""
    op, rows, tokens, kv_len, max_position, slot_start, kind, logits = header
    if op == ALLOC:
        return Batch(op, alloc_slots=rows, kv_len=kv_len)
    if op not in (STEP, SCORE):
        return Batch(op)
    n = rows * tokens
    ids = payload[:n].view(rows, tokens)
    positions = payload[n : 2 * n].view(rows, tokens)
    slots = payload[2 * n :] if op == STEP else None
    attention = AttentionBatch(positions, kind, max_position, kv_len if op == STEP else 0, slots,
                               slot_start if slot_start >= 0 else None)
    return Batch(op, ids, attention, logits)
