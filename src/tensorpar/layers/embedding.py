"""Vocabulary-parallel embedding and LM head.

The vocabulary is split into contiguous spans, one per rank (``partition.vocab_shard``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorpar.distributed.collectives import copy_to_tp, gather_from_tp, reduce_from_tp, reduce_scatter_seq
from tensorpar.distributed.groups import ParallelContext
from tensorpar.layers.linear import ShardReader, gathered_linear, load_pieces
from tensorpar.layers.pieces import Piece


class VocabParallelEmbedding(nn.Module):
    """E[ids] with E split by rows: rank i holds rows ``span``; ids outside it contribute zeros.

    out = all-reduce_i( onehot(ids)[:, span_i] E_i ). Local weight: [len(span), dim]. With
    ``sequence_parallel`` the sum is reduce-scattered along the sequence: [B, S] -> [B, S/p, dim].
    """

    sequence_parallel = False

    def __init__(self, span: range, dim: int, ctx: ParallelContext, part: str):
        super().__init__()
        self.ctx = ctx
        self.span = span
        self.part = part
        self.weight = nn.Parameter(torch.empty(len(span), dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [B, S] -> [B, S, dim]
        if self.ctx.world_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.span.start) | (ids >= self.span.stop)
        local = (ids - self.span.start).masked_fill_(outside, 0)
        out = F.embedding(local, self.weight).masked_fill_(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_seq(out, self.ctx)
        return reduce_from_tp(out, self.ctx)

    def pieces(self) -> dict[str, list[Piece]]:
        return {"weight": [Piece(self.part, "weight", 0, self.span, range(len(self.span)))]}

    def load_shard(self, read: ShardReader) -> None:
        load_pieces(self, read)

    def extra_repr(self) -> str:
        return f"vocab_span=[{self.span.start}, {self.span.stop}), dim={self.weight.shape[1]}"


class ParallelLMHead(nn.Module):
    """logits = h W^T with W split by vocabulary rows; ``forward`` gathers the full vocabulary.

    ``shard_sizes[r]`` is rank r's number of vocabulary rows. Each rank pads its logits to
    ``max(shard_sizes)`` columns so that every rank sends an equal share; the gathered
    [..., p * padded] is trimmed back to [..., vocab]. With tied embeddings the weight *is* the
    embedding's shard (same span). With ``sequence_parallel`` h arrives split along the sequence
    and is all-gathered before the product.
    """

    sequence_parallel = False

    def __init__(
        self,
        span: range,
        shard_sizes: list[int],
        dim: int,
        ctx: ParallelContext,
        part: str,
        tied: VocabParallelEmbedding | None = None,
    ):
        super().__init__()
        self.ctx = ctx
        self.span = span
        self.shard_sizes = shard_sizes
        self.padded = max(shard_sizes)
        self.part = part
        self.tied = tied is not None
        if tied is None:
            self.weight = nn.Parameter(torch.empty(len(span), dim))
        else:  # share the embedding's parameter without registering it twice
            object.__setattr__(self, "_embedding", tied)
        self.even = min(shard_sizes) == self.padded

    def __getattr__(self, name: str):
        if name == "weight" and "_embedding" in self.__dict__:
            return self.__dict__["_embedding"].weight
        return super().__getattr__(name)

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        # h: [..., dim] or [B, S/p, dim] (sequence-parallel) -> [..., len(span)]
        if self.sequence_parallel:
            return gathered_linear(h, self.weight, None, self.ctx)
        return F.linear(copy_to_tp(h, self.ctx), self.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: [..., dim] -> [..., vocab]
        local = self.local_logits(h)
        if self.ctx.world_size == 1:
            return local
        if not self.even:
            local = F.pad(local, (0, self.padded - local.shape[-1]))
        full = gather_from_tp(local, self.ctx)  # [..., p * padded]
        if self.even:
            return full
        chunks = full.split(self.padded, dim=-1)
        return torch.cat([c[..., :n] for c, n in zip(chunks, self.shard_sizes)], dim=-1)

    def pieces(self) -> dict[str, list[Piece]]:
        if self.tied:  # the embedding owns the shared parameter
            return {}
        return {"weight": [Piece(self.part, "weight", 0, self.span, range(len(self.span)))]}

    def load_shard(self, read: ShardReader) -> None:
        load_pieces(self, read)

    def extra_repr(self) -> str:
        return f"vocab_span=[{self.span.start}, {self.span.stop}), tied={self.tied}"
