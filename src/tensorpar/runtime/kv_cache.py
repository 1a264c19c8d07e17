"""The KV cache: a pool of fixed-size blocks per rank, shared by every running sequence.

Each layer's keys and values are a [num_blocks, block_size, kv_heads_local, head_dim] tensor:
block b holds ``block_size`` consecutive positions of one sequence, for the KV heads this rank
holds. A sequence owns a list of blocks (its block table, kept by the leader's
``tensorpar.runtime.block_manager``): position p lives at offset p % block_size of block
table[p // block_size]. Block 0 is never handed out: it pads block tables of shorter rows.

Reserved, not touched: a block's memory is zeroed (and so becomes resident) the first time it is
handed out (``zero_through``). Zeroed matters: a batch reads each row's blocks up to the longest
row's length, masked, and a masked NaN would still poison the attention output.
"""

from __future__ import annotations

import torch


class KVCache:
    """``layer_shapes`` gives (kv_heads_local, head_dim) per layer (the model's ``kv_cache_shape()``)."""

    def __init__(self, layer_shapes: list[tuple[int, int]], num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        shape = [(num_blocks, block_size, kv, d) for kv, d in layer_shapes]
        self.k = [torch.empty(s, dtype=dtype, device=device) for s in shape]
        self.v = [torch.empty(s, dtype=dtype, device=device) for s in shape]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.zeroed = 0  # blocks 0 .. zeroed-1 hold finite values
        self.zero_through(1)  # the padding block

    @staticmethod
    def bytes_per_block(layer_shapes: list[tuple[int, int]], block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes on this rank: keys and values of every layer it holds."""
        return 2 * block_size * sum(kv * d for kv, d in layer_shapes) * dtype.itemsize

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def zero_through(self, n: int) -> None:
        """Blocks below ``n`` are about to be used: zero those never used before."""
        if n > self.zeroed:
            for t in (*self.k, *self.v):
                t[self.zeroed : n].zero_()
            self.zeroed = n
