"""What one forward's attention needs, for every layer: positions, keys, masks and cache blocks.

A batch is B rows of S new tokens. Without a cache every row is a fresh sequence and its keys are
its own tokens. With a cache (a pool of blocks of ``block_size`` positions, see
``tensorpar.runtime.kv_cache``; each row names its blocks in order, its block table) the new keys
and values are written at their positions in the row's blocks, and the queries attend to
positions ``0..kv_len-1`` of the row, gathered from its blocks.

Which keys a query may see is stated by ``kind``, decided by whoever knows the step (the
runtime's leader, from Python lists), so that a layer never inspects tensor values:

- ``ALL_KEYS``: every query sees every key (decode: each row's one new token comes after all of
  its cached ones, and every row has the same length).
- ``CAUSAL``: fresh sequences from position 0; plain causal attention over their own tokens.
- ``BY_POSITION``: key at position l is visible to a query at position q iff l <= q.

A sliding window w adds l > q - w; a layer with a window asks ``mask(w)``, which falls back to an
explicit mask only when the keys reach further back than w. Packed training rows
(``packed_documents``) hold several documents each: a query sees the earlier keys of its own
document only, whatever the kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALL_KEYS, CAUSAL, BY_POSITION = 0, 1, 2


@dataclass
class AttentionBatch:
    """positions: [B, S] absolute positions of the new tokens (where their keys go in the cache).

    max_position: the largest of them (a Python int: the rotary table's length is known without
    a device sync). kv_len: cached keys each row attends to (0 without a cache). blocks: [B, n]
    each row's block table, n = ceil(kv_len / block_size) (shorter rows padded with block 0).
    """

    positions: torch.Tensor
    kind: int
    max_position: int
    kv_len: int = 0
    blocks: torch.Tensor | None = None
    documents: torch.Tensor | None = None  # [B, S]: the document of each token of a packed row
    _masks: dict = field(default_factory=dict, repr=False)
    _cache_rows: tuple | None = field(default=None, repr=False)

    @classmethod
    def fresh(cls, batch: int, length: int, device: torch.device) -> "AttentionBatch":
        """Rows that are whole sequences from position 0, attended without a cache."""
        positions = torch.arange(length, device=device).expand(batch, length)
        return cls(positions, CAUSAL, length - 1)

    @classmethod
    def packed_documents(cls, documents: torch.Tensor) -> "AttentionBatch":
        """Fresh rows of several documents each, ``documents`` [B, S] naming each token's (equal ids
        adjacent): positions restart at 0 with each document, and attention stays within it."""
        B, S = documents.shape
        index = torch.arange(S, device=documents.device).expand(B, S)
        starts = torch.ones_like(documents, dtype=torch.bool)
        starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
        first = torch.where(starts, index, 0).cummax(dim=1).values  # [B, S]: where each token's document starts
        positions = index - first
        return cls(positions, BY_POSITION, int(positions.max()), documents=documents)

    def rows(self, start: int, stop: int) -> "AttentionBatch":
        """Rows ``start:stop`` of this batch (a micro-batch): same keys to attend, same table length."""
        return AttentionBatch(self.positions[start:stop], self.kind, self.max_position, self.kv_len,
                              None if self.blocks is None else self.blocks[start:stop],
                              None if self.documents is None else self.documents[start:stop])

    @property
    def num_keys(self) -> int:
        return self.kv_len or self.positions.shape[1]

    def mask(self, window: int | None = None) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for ``F.scaled_dot_product_attention``: the mask is [B, 1, S, L]
        (True: visible), or None when ``kind`` alone says it."""
        kind = self.kind
        if self.documents is not None:
            if window not in self._masks:
                S = self.documents.shape[1]
                index = torch.arange(S, device=self.documents.device)
                visible = (index[None, :] <= index[:, None]) & (self.documents[:, :, None] == self.documents[:, None, :])
                if window is not None:  # [B, S, S]
                    visible &= self.positions[:, None, :] > self.positions[:, :, None] - window
                self._masks[window] = visible.unsqueeze(1)
            return self._masks[window], False
        if window is not None and self.num_keys > window:
            kind = BY_POSITION
        if kind == ALL_KEYS:
            return None, False
        if kind == CAUSAL:
            return None, True
        if window not in self._masks:
            q = self.positions.unsqueeze(-1)  # [B, S, 1]
            if self.kv_len:
                keys = torch.arange(self.kv_len, device=q.device).view(1, 1, -1)  # [1, 1, L]
            else:
                keys = self.positions.unsqueeze(1)  # [B, 1, L = S]
            visible = keys <= q
            if window is not None:
                visible &= keys > q - window
            self._masks[window] = visible.unsqueeze(1)
        return self._masks[window], False

    def _rows(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of a layer's cache viewed as [blocks * block_size, kv_heads, D] (the same for
        every layer): where each new token goes, [B * S], and each row's keys 0..kv_len-1, [B * kv_len]."""
        if self._cache_rows is None or self._cache_rows[0] != block_size:
            table = self.blocks * block_size  # [B, n]: each block's first row
            new = table.gather(1, self.positions // block_size) + self.positions % block_size  # [B, S]
            keys = (table[:, :, None] + torch.arange(block_size, device=table.device)).flatten(1)[:, : self.kv_len]
            self._cache_rows = (block_size, new.reshape(-1), keys.reshape(-1))
        return self._cache_rows[1], self._cache_rows[2]

    def keys_values(self, k: torch.Tensor, v: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None):
        """The keys and values to attend to, [B, kv_heads, L, D], from the new ones [B, S, kv_heads, D]
        (written into ``cache``, one layer's [blocks, block_size, kv_heads, D] pair, when there is one)."""
        if cache is None:  # (a copy of v, so that backward does not keep the whole fused projection alive)
            return k.transpose(1, 2), v.transpose(1, 2).contiguous()
        ck, cv = (c.flatten(0, 1) for c in cache)  # [blocks * block_size, kv, D]
        new, keys = self._rows(cache[0].shape[1])
        B, S, kv, D = k.shape
        ck.index_copy_(0, new, k.reshape(B * S, kv, D))
        cv.index_copy_(0, new, v.reshape(B * S, kv, D))
        L = self.kv_len
        return (ck.index_select(0, keys).view(B, L, kv, D).transpose(1, 2),  # [B, kv, L, D]
                cv.index_select(0, keys).view(B, L, kv, D).transpose(1, 2))


class PackedBatch:
    """Several ``AttentionBatch``es (parts) packed into one row of T tokens: a step that mixes the
    running sequences' decode tokens with prompts, or chunks of prompts, of other lengths.

    The model runs everything but attention once over the packed row [1, T, ...]; attention runs
    part by part, each part's span of the row viewed as its own [rows, tokens, ...] (``unpack``).
    ``positions`` [1, T] are every part's positions in that order, ``last`` [rows] the index in
    the row of each part's rows' last tokens (rows in part order).
    """

    def __init__(self, parts: list[AttentionBatch]):
        self.parts = parts
        sizes = [p.positions.numel() for p in parts]
        self.starts = [sum(sizes[:i]) for i in range(len(parts) + 1)]
        self.positions = torch.cat([p.positions.reshape(-1) for p in parts]).view(1, -1)  # [1, T]
        self.max_position = max(p.max_position for p in parts)
        last = []
        for p, start in zip(parts, self.starts):
            rows, tokens = p.positions.shape
            last += [start + (r + 1) * tokens - 1 for r in range(rows)]
        self.last = torch.tensor(last, device=self.positions.device)

    def unpack(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Part ``i``'s tokens of ``x`` [1, T, ...] as [rows, tokens, ...]."""
        return x[0, self.starts[i] : self.starts[i + 1]].view(*self.parts[i].positions.shape, *x.shape[2:])
