"""The KV cache: preallocated slots, one per running sequence."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, each a [slots, kv_heads_local, max_len, head_dim] tensor.

    ``layer_shapes`` gives (kv_heads_local, head_dim) per layer (the model's ``kv_cache_shape()``).
    Reserved, not touched: a slot's memory is zeroed (and so becomes resident) the first time a
    sequence starts in it (``start``). Zeroed matters: a batch reads each slot up to the longest
    sequence's length, masked, and a masked NaN would still poison the attention output.
    """

    def __init__(self, layer_shapes: list[tuple[int, int]], slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device):
        self.k = [torch.empty((slots, kv, max_len, d), dtype=dtype, device=device) for kv, d in layer_shapes]
        self.v = [torch.empty((slots, kv, max_len, d), dtype=dtype, device=device) for kv, d in layer_shapes]
        self.slots, self.max_len = slots, max_len
        self._zeroed: set[int] = set()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def fits(self, slots: int, max_len: int) -> bool:
        return slots <= self.slots and max_len <= self.max_len

    def start(self, slot: int) -> None:
        """A sequence begins in ``slot``: make sure its memory holds finite values."""
        if slot not in self._zeroed:
            for t in (*self.k, *self.v):
                t[slot].zero_()
            self._zeroed.add(slot)
