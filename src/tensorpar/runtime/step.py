"""The messages the leader broadcasts to every rank, one before each thing all ranks do together.

A message is a fixed header of eight integers, then, for model steps, a payload. The header and
the payload say everything a rank needs to know without looking at tensor values (so no rank,
and no model, syncs with the device to find out):

    header:  op, parts, slot entries, tokens, alloc_len, logits, 0, 0
    payload: per part (rows, tokens, kv_len, max_position, slot_start, kind), then every part's
             token ids, then their positions (row-major), then their cache slots

A model step is made of *parts*, each a rectangle of ``rows`` sequences of ``tokens`` new tokens
that attend alike (``tensorpar.layers.attention``): the running sequences' decode tokens are one
part, and each prompt (or chunk of a prompt) that a step prefills is another. ``kind`` is a
part's attention pattern, ``slot_start`` its first slot when its slots are consecutive (else -1).
A step of one part runs as a [rows, tokens] batch; a step of several runs packed, all tokens in one
row, each part attending on its own (``PackedBatch``).

- ``STEP``: write the new tokens into their cache slots; the leader gets the logits of every row's
  last token, rows in part order, as ``logits`` says (``FULL`` or ``GREEDY``).
- ``SCORE``: one fresh sequence without the cache; logits of every position go to the leader.
- ``ALLOC``: a KV cache of ``alloc_slots`` slots of ``alloc_len`` positions.
- ``NOOP``: a keep-alive from an idle leader (followers then know it is alive).
- ``END``: the end of one collective call (``Worker.generate`` / ``score``).
- ``SHUTDOWN``: followers leave their loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensorpar.layers.attention import ALL_KEYS, BY_POSITION, CAUSAL, AttentionBatch, PackedBatch

END, STEP, SCORE, ALLOC, NOOP, SHUTDOWN = range(6)
FULL, GREEDY = 0, 1  # the leader gets full-vocabulary logits, or each row's argmax and its log-probability
HEADER_SIZE = 8
PART_SIZE = 6  # integers per part in the payload


@dataclass(frozen=True)
class Part:
    """``rows`` sequences of equally many new tokens that attend alike."""

    ids: tuple[tuple[int, ...], ...]  # [rows][tokens]
    positions: tuple[tuple[int, ...], ...]
    slots: tuple[int, ...] = ()  # one per row (none for SCORE)
    kv_len: int = 0
    max_position: int = 0
    slot_start: int = -1
    kind: int = CAUSAL

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ids), len(self.ids[0])

    def table(self) -> list[int]:
        return [*self.shape, self.kv_len, self.max_position, self.slot_start, self.kind]


@dataclass(frozen=True)
class Message:
    op: int
    parts: tuple[Part, ...] = ()
    logits: int = FULL
    alloc_slots: int = 0
    alloc_len: int = 0

    @property
    def ids(self) -> list[tuple[int, ...]]:
        """Every row's new tokens, rows in part order."""
        return [row for p in self.parts for row in p.ids]

    def header(self) -> list[int]:
        slots = self.alloc_slots if self.op == ALLOC else sum(len(p.slots) for p in self.parts)
        tokens = sum(len(p.ids) * len(p.ids[0]) for p in self.parts)
        return [self.op, len(self.parts), slots, tokens, self.alloc_len, self.logits, 0, 0]

    def payload(self) -> list[int]:
        """The part table, ids, positions (row-major), slots."""
        out = [v for p in self.parts for v in p.table()]
        out += [t for p in self.parts for row in p.ids for t in row]
        out += [q for p in self.parts for row in p.positions for q in row]
        return out + [s for p in self.parts for s in p.slots]

    @staticmethod
    def payload_size(header: list[int]) -> int:
        op, parts, slots, tokens = header[:4]
        return PART_SIZE * parts + 2 * tokens + slots if op in (STEP, SCORE) else 0


def chunk(prompt: list[int], start: int, stop: int, slot: int) -> Part:
    """Prompt tokens ``start:stop`` of a sequence in cache slot ``slot`` (``prompt[:start]`` already
    cached): the whole prompt when ``start`` is 0 and ``stop`` its length (a fresh sequence, plain
    causal attention), else a chunk that also attends to the cached positions before it."""
    positions = tuple(range(start, stop))
    return Part((tuple(prompt[start:stop]),), (positions,), (slot,), kv_len=stop, max_position=stop - 1,
                slot_start=slot, kind=CAUSAL if start == 0 else BY_POSITION)


def decode_part(tokens: list[int], positions: list[int], slots: list[int]) -> Part:
    """One new token for each running sequence, at its next position."""
    kv_len = max(positions) + 1
    consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
    kind = ALL_KEYS if all(p == kv_len - 1 for p in positions) else BY_POSITION
    return Part(tuple((t,) for t in tokens), tuple((p,) for p in positions), tuple(slots), kv_len=kv_len,
                max_position=kv_len - 1, slot_start=slots[0] if consecutive else -1, kind=kind)


def step(parts: list[Part], logits: int = FULL) -> Message:
    return Message(STEP, tuple(parts), logits)


def prefill(prompt: list[int], slot: int, logits: int = FULL) -> Message:
    """A new sequence's whole prompt, from position 0, into cache slot ``slot``."""
    return step([chunk(prompt, 0, len(prompt), slot)], logits)


def decode(tokens: list[int], positions: list[int], slots: list[int], logits: int = FULL) -> Message:
    return step([decode_part(tokens, positions, slots)], logits)


def score(prompt: list[int]) -> Message:
    n = len(prompt)
    return Message(SCORE, (Part((tuple(prompt),), (tuple(range(n)),), max_position=n - 1, kind=CAUSAL),))


def allocate(slots: int, max_len: int) -> Message:
    return Message(ALLOC, alloc_slots=slots, alloc_len=max_len)


@dataclass
class Batch:
    """A model step as tensors on this rank's device: input ids ([rows, tokens] for one part, all
    tokens in one row [1, T] for several) and what attention needs."""

    op: int
    ids: torch.Tensor | None = None
    attention: AttentionBatch | PackedBatch | None = None
    parts: tuple[AttentionBatch, ...] = ()
    logits: int = FULL
    alloc_slots: int = 0
    alloc_len: int = 0

    def last_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """[rows, hidden]: each row's last token of the step's output ``out`` [.., .., hidden]."""
        if isinstance(self.attention, PackedBatch):
            return out[0, self.attention.last]
        return out[:, -1]


def to_batch(header: list[int], payload: torch.Tensor | None) -> Batch:
    """What every rank runs, from the header and payload it received (the leader: that it sent)."""
    op, n_parts, n_slots, n_tokens, alloc_len, logits = header[:6]
    if op == ALLOC:
        return Batch(op, alloc_slots=n_slots, alloc_len=alloc_len)
    if op not in (STEP, SCORE):
        return Batch(op)
    table = payload[: PART_SIZE * n_parts].view(n_parts, PART_SIZE).tolist()
    at = PART_SIZE * n_parts
    ids, positions = payload[at : at + n_tokens], payload[at + n_tokens : at + 2 * n_tokens]
    slots = payload[at + 2 * n_tokens :]
    parts, token, row = [], 0, 0
    for rows, tokens, kv_len, max_position, slot_start, kind in table:
        n = rows * tokens
        part_slots = slots[row : row + rows] if op == STEP else None
        parts.append(AttentionBatch(positions[token : token + n].view(rows, tokens), kind, max_position,
                                    kv_len if op == STEP else 0, part_slots, slot_start if slot_start >= 0 else None))
        token, row = token + n, row + rows
    if len(parts) == 1:
        return Batch(op, ids.view(*table[0][:2]), parts[0], tuple(parts), logits)
    return Batch(op, ids.view(1, n_tokens), PackedBatch(parts), tuple(parts), logits)
