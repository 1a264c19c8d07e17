"""The messages the leader broadcasts to every rank, one before each thing all ranks do together,
and what a step gives back (``StepOutput``).

A message is a fixed header of eight integers, then, for model steps, a payload. The header and
the payload say everything a rank needs to know without looking at tensor values (so no rank,
and no model, syncs with the device to find out). Both travel on the control channel, a CPU one
(``collectives.broadcast_control``); a rank copies the ids, positions and block tables to its
device once (``to_batch``), and the leader reads nothing back: it builds its ``Batch`` from the
message's own lists.

    header:  op, parts, block-table entries, tokens, block_size, logits, blocks in use, model
    payload: per part (rows, tokens, kv_len, max_position, blocks per row, kind, outputs), then every
             part's token ids, then their positions (row-major), then their block tables

A model step is made of *parts*, each a rectangle of ``rows`` sequences of ``tokens`` new tokens
that attend alike (``tensorpar.layers.attention``): the running sequences' decode tokens are one
part, and each prompt (or chunk of a prompt) that a step prefills is another. ``kind`` is a
part's attention pattern; each of its rows has a block table of ``ceil(kv_len / block_size)``
KV-cache blocks (``tensorpar.runtime.kv_cache``). A step of one part runs as a [rows, tokens] batch; a step of several runs packed, all tokens in one
row, each part attending on its own (``PackedBatch``).

- ``STEP``: write the new tokens into their cache blocks; the leader gets the logits of every row's
  last token, rows in part order, as ``logits`` says (``FULL`` or ``GREEDY``); of every token of a
  part whose ``outputs`` is ``EVERY`` (speculative decoding's verification, ``runtime.speculative``). ``in_use``: the
  blocks below it may be in use (every rank zeroes those it has never used, ``KVCache.zero_through``).
- ``SCORE``: one fresh sequence without the cache; logits of every position go to the leader.
- ``ALLOC``: a KV cache of ``num_blocks`` blocks of ``block_size`` positions.
- ``RELOAD``: replace the weights in place by those of the checkpoint whose path is the payload
  (its UTF-8 bytes, one per integer; ``tokens`` in the header is their count).
- ``NOOP``: a keep-alive from an idle leader (followers then know it is alive).
- ``END``: the end of one collective call (``Worker.generate`` / ``score``).
- ``SHUTDOWN``: followers leave their loop.

``model`` is 0 for the served (target) model, 1 for a speculative draft model, which the first
``draft_tensor_parallel_size`` ranks hold beside their target shards (the others skip its messages).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensorpar.layers.attention import ALL_KEYS, BY_POSITION, CAUSAL, AttentionBatch, PackedBatch

END, STEP, SCORE, ALLOC, NOOP, SHUTDOWN, RELOAD = range(7)
FULL, GREEDY = 0, 1  # the leader gets full-vocabulary logits, or each row's argmax and its log-probability
LAST, EVERY = 0, 1  # a part's outputs: each row's last token, or every token
TARGET, DRAFT = 0, 1  # the model a message is for
HEADER_SIZE = 8
PART_SIZE = 7  # integers per part in the payload


@dataclass(frozen=True)
class Part:
    """``rows`` sequences of equally many new tokens that attend alike."""

    ids: tuple[tuple[int, ...], ...]  # [rows][tokens]
    positions: tuple[tuple[int, ...], ...]
    blocks: tuple[tuple[int, ...], ...] = ()  # each row's block table, equally long (none for SCORE)
    kv_len: int = 0
    max_position: int = 0
    kind: int = CAUSAL
    outputs: int = LAST

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ids), len(self.ids[0])

    @property
    def output_rows(self) -> int:
        """Rows of the step's output this part gives: one per row, or one per token (``EVERY``)."""
        rows, tokens = self.shape
        return rows * tokens if self.outputs == EVERY else rows

    def table(self) -> list[int]:
        """The part's row of the part table: rows, tokens, kv_len, max_position, blocks per row,
        kind, outputs."""
        return [*self.shape, self.kv_len, self.max_position, len(self.blocks[0]) if self.blocks else 0, self.kind,
                self.outputs]


@dataclass(frozen=True)
class Message:
    op: int
    parts: tuple[Part, ...] = ()
    logits: int = FULL
    num_blocks: int = 0
    block_size: int = 0
    in_use: int = 0
    path: str = ""  # RELOAD's checkpoint
    model: int = TARGET

    @property
    def ids(self) -> list[tuple[int, ...]]:
        """Every row's new tokens, rows in part order."""
        return [row for p in self.parts for row in p.ids]

    def header(self) -> list[int]:
        entries = self.num_blocks if self.op == ALLOC else sum(len(t) for p in self.parts for t in p.blocks)
        tokens = len(self.path.encode()) if self.op == RELOAD else sum(len(p.ids) * len(p.ids[0]) for p in self.parts)
        return [self.op, len(self.parts), entries, tokens, self.block_size, self.logits, self.in_use, self.model]

    def table(self) -> list[list[int]]:
        """The part table, a row per part (``Part.table``)."""
        return [p.table() for p in self.parts]

    def payload(self) -> list[int]:
        """The part table, ids, positions (row-major), block tables; RELOAD's path."""
        if self.op == RELOAD:
            return list(self.path.encode())
        out = [v for row in self.table() for v in row]
        out += [t for p in self.parts for row in p.ids for t in row]
        out += [q for p in self.parts for row in p.positions for q in row]
        return out + [b for p in self.parts for table in p.blocks for b in table]

    @staticmethod
    def payload_size(header: list[int]) -> int:
        op, parts, entries, tokens = header[:4]
        if op == RELOAD:
            return tokens
        return PART_SIZE * parts + 2 * tokens + entries if op in (STEP, SCORE) else 0


def chunk(tokens: list[int], start: int, stop: int, blocks: list[int], block_size: int, outputs: int = LAST) -> Part:
    """Tokens ``start:stop`` of a sequence whose block table is ``blocks`` (``tokens[:start]``
    already cached): the whole prompt when ``start`` is 0 (a fresh sequence, plain causal
    attention), else a chunk that also attends to the cached positions before it."""
    positions = tuple(range(start, stop))
    return Part((tuple(tokens[start:stop]),), (positions,), (tuple(blocks[: -(-stop // block_size)]),), kv_len=stop,
                max_position=stop - 1, kind=CAUSAL if start == 0 else BY_POSITION, outputs=outputs)


def decode_part(tokens: list[int], positions: list[int], blocks: list[list[int]], block_size: int) -> Part:
    """One new token for each running sequence, at its next position; block tables padded with
    block 0 to the longest row's."""
    kv_len = max(positions) + 1
    n = -(-kv_len // block_size)
    kind = ALL_KEYS if all(p == kv_len - 1 for p in positions) else BY_POSITION
    tables = tuple(tuple(t[:n]) + (0,) * (n - min(len(t), n)) for t in blocks)
    return Part(tuple((t,) for t in tokens), tuple((p,) for p in positions), tables, kv_len=kv_len,
                max_position=kv_len - 1, kind=kind)


def logits_for(params: list) -> int:
    """What a step's rows (their ``SamplingParams``) need: greedy rows that report no top
    log-probabilities only their argmax and its log-probability (each rank's share, combined: in
    deterministic mode the whole logits go to the leader, whose log-probabilities are summed in one
    fixed order instead)."""
    from tensorpar.layers import deterministic

    simple = all(p.greedy and not p.logprobs and not p.controls_logits for p in params)
    return GREEDY if simple and not deterministic.enabled() else FULL


def step(parts: list[Part], logits: int = FULL, in_use: int = 0, model: int = TARGET) -> Message:
    return Message(STEP, tuple(parts), logits, in_use=in_use, model=model)


def score(prompt: list[int]) -> Message:
    n = len(prompt)
    return Message(SCORE, (Part((tuple(prompt),), (tuple(range(n)),), max_position=n - 1, kind=CAUSAL),))


def allocate(num_blocks: int, block_size: int, model: int = TARGET) -> Message:
    return Message(ALLOC, num_blocks=num_blocks, block_size=block_size, model=model)


def reload(path: str) -> Message:
    return Message(RELOAD, path=path)


@dataclass(frozen=True)
class StepOutput:
    """What a step gives the leader. A ``GREEDY`` step: each row's argmax token ``ids`` [rows] and
    its ``logprobs`` [rows] (log-softmax over the whole vocabulary). A ``FULL`` step: ``logits``
    [rows, vocab], a row per sequence, rows in part order. A ``SCORE`` step: ``logits``
    [positions, vocab], every position of the one prompt."""

    ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@dataclass
class Batch:
    """A model step as tensors on this rank's device: input ids ([rows, tokens] for one part, all
    tokens in one row [1, T] for several) and what attention needs."""

    op: int
    ids: torch.Tensor | None = None
    attention: AttentionBatch | PackedBatch | None = None
    parts: tuple[AttentionBatch, ...] = ()
    logits: int = FULL
    num_blocks: int = 0
    block_size: int = 0
    in_use: int = 0
    path: str = ""
    model: int = TARGET
    outputs: torch.Tensor | None = None  # packed tokens whose logits are out, where some part's are ``EVERY``
    every: bool = False  # one part, all of whose tokens' logits are out

    def output_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """[output rows, hidden]: the tokens of the step's output ``out`` [.., .., hidden] whose
        logits go out: each row's last, or every token of an ``EVERY`` part, in part order."""
        if isinstance(self.attention, PackedBatch):
            return out[0, self.attention.last if self.outputs is None else self.outputs]
        return out.reshape(-1, out.shape[-1]) if self.every else out[:, -1]


def to_batch(header: list[int], payload: torch.Tensor | None, device: torch.device | str = "cpu",
             table: list[list[int]] | None = None) -> Batch:
    """What every rank runs, from the header and the payload (a CPU tensor: part table, ids,
    positions, block tables) it received; the leader passes the part ``table`` it sent (its
    ``Message.table()``), so nothing is read back. Ids, positions and block tables go to
    ``device`` in one copy."""
    op, n_parts, n_entries, n_tokens, block_size, logits, in_use, model = header[:8]
    if op == ALLOC:
        return Batch(op, num_blocks=n_entries, block_size=block_size, model=model)
    if op == RELOAD:
        return Batch(op, path=bytes(payload.tolist()).decode())
    if op not in (STEP, SCORE):
        return Batch(op, model=model)
    if table is None:
        table = payload[: PART_SIZE * n_parts].view(n_parts, PART_SIZE).tolist()
    data = payload[PART_SIZE * n_parts :].to(device)  # ids [T], positions [T], block-table entries
    ids, positions, entries = data[:n_tokens], data[n_tokens : 2 * n_tokens], data[2 * n_tokens :]
    parts, token, entry, outputs = [], 0, 0, []
    for rows, tokens, kv_len, max_position, per_row, kind, out in table:
        n = rows * tokens
        blocks = entries[entry : entry + rows * per_row].view(rows, per_row) if op == STEP else None
        parts.append(AttentionBatch(positions[token : token + n].view(rows, tokens), kind, max_position,
                                    kv_len if op == STEP else 0, blocks))
        outputs += range(token, token + n) if out == EVERY else range(token + tokens - 1, token + n, tokens)
        token, entry = token + n, entry + rows * per_row
    every = any(row[6] == EVERY for row in table)
    if len(parts) == 1:
        return Batch(op, ids.view(*table[0][:2]), parts[0], tuple(parts), logits, in_use=in_use, model=model,
                     every=every)
    return Batch(op, ids.view(1, n_tokens), PackedBatch(parts), tuple(parts), logits, in_use=in_use, model=model,
                 outputs=torch.tensor(outputs, device=device) if every else None)
