"""Vocabulary-parallel embedding and LM head.

The vocabulary is split into contiguous spans, one per rank (``partition.vocab_shard``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorpar.distributed.collectives import copy_to_tp, gather, gather_from_tp, reduce_from_tp, reduce_scatter_seq
from tensorpar.distributed.groups import ParallelContext
from tensorpar.layers import deterministic, deterministic_grads
from tensorpar.layers.linear import gathered_linear
from tensorpar.layers.quant import embedding, linear
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
            return embedding(ids, self.weight)
        outside = (ids < self.span.start) | (ids >= self.span.stop)
        local = (ids - self.span.start).masked_fill_(outside, 0)
        out = embedding(local, self.weight).masked_fill_(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_seq(out, self.ctx)
        return reduce_from_tp(out, self.ctx)

    def pieces(self) -> dict[str, list[Piece]]:
        return {"weight": [Piece(self.part, "weight", 0, self.span, range(len(self.span)))]}

    def extra_repr(self) -> str:
        return f"vocab_span=[{self.span.start}, {self.span.stop}), dim={self.weight.shape[1]}"


class ParallelLMHead(nn.Module):
    """logits = h W^T with W split by vocabulary rows: rank i computes z_i = h W_i^T, its span.

    ``shard_sizes[r]`` is rank r's number of vocabulary rows. Three ways out of the shards:

    - ``forward``: every rank gets the full [..., vocab] (all-gather);
    - ``logits_to_leader``: only rank 0 gets it (gather); the others get None;
    - ``greedy_to_leader``: only rank 0 gets each row's argmax and log-probability, from three
      numbers per row and rank: max_i, argmax_i and logsumexp_i of z_i. The argmax of the rank
      with the largest max wins (the lowest rank on ties, so the first index, as ``argmax`` of
      the full row), and logsumexp(z) = logsumexp_i(logsumexp_i z_i).

    Shards are padded to ``max(shard_sizes)`` columns so that every rank sends an equal share, and
    trimmed after. ``tie`` makes the weight *the* embedding's shard (same span). With
    ``sequence_parallel`` h arrives split along the sequence and is all-gathered before the product.
    """

    sequence_parallel = False
    out_grid: list[tuple[tuple, range]] = []  # deterministic mode: (global chunk, local rows) of each vocabulary chunk

    def __init__(self, span: range, shard_sizes: list[int], dim: int, ctx: ParallelContext, part: str):
        super().__init__()
        self.ctx = ctx
        self.span = span
        self.shard_sizes = shard_sizes
        self.padded = max(shard_sizes)
        self.part = part
        self.tied = False
        self.weight = nn.Parameter(torch.empty(len(span), dim))

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        """Use ``embedding``'s weight (which owns it in ``pieces``) instead of a weight of its own."""
        if embedding.span != self.span:
            raise ValueError(f"cannot tie a head over {self.span} to an embedding over {embedding.span}")
        self.weight = embedding.weight
        self.tied = True

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        # h: [..., dim] or [B, S/p, dim] (sequence-parallel) -> [..., len(span)]
        if deterministic.enabled() and deterministic_grads.wanted(h, self.weight):
            return deterministic_grads.column(h, self)
        if self.sequence_parallel:
            return gathered_linear(h, self.weight, None, self.ctx)
        return linear(copy_to_tp(h, self.ctx), self.weight)

    def _padded(self, local: torch.Tensor) -> torch.Tensor:
        return local if local.shape[-1] == self.padded else F.pad(local, (0, self.padded - local.shape[-1]))

    def _trimmed(self, chunks) -> torch.Tensor:
        return torch.cat([c[..., :n] for c, n in zip(chunks, self.shard_sizes)], dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: [..., dim] -> [..., vocab] on every rank
        local = self.local_logits(h)
        if self.ctx.world_size == 1:
            return local
        full = gather_from_tp(self._padded(local), self.ctx)  # [..., p * padded]
        return full if min(self.shard_sizes) == self.padded else self._trimmed(full.split(self.padded, dim=-1))

    @torch.no_grad()
    def logits_to_leader(self, h: torch.Tensor) -> torch.Tensor | None:
        # h: [..., dim] -> [..., vocab] on rank 0, None on the others
        local = self.local_logits(h)
        if self.ctx.world_size == 1:
            return local
        parts = gather(self._padded(local), self.ctx)  # [p, ..., padded] on rank 0
        return None if parts is None else self._trimmed(parts.unbind(0))

    @torch.no_grad()
    def greedy_to_leader(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        # h: [B, dim] -> (token ids [B], log-probabilities [B]) on rank 0, None on the others
        local = self.local_logits(h).float()  # [B, len(span)]
        best, index = local.max(dim=-1)
        stats = torch.stack([best, (index + self.span.start).float(), torch.logsumexp(local, dim=-1)], dim=-1)
        parts = gather(stats, self.ctx)  # [p, B, 3] on rank 0 (ids below 2^24 are exact in float32)
        if parts is None:
            return None
        winner = parts[..., 0].argmax(dim=0, keepdim=True)  # [1, B]
        best = parts[..., 0].gather(0, winner)[0]
        ids = parts[..., 1].gather(0, winner)[0].long()
        return ids, best - torch.logsumexp(parts[..., 2], dim=0)

    def pieces(self) -> dict[str, list[Piece]]:
        if self.tied:  # the embedding owns the shared parameter
            return {}
        return {"weight": [Piece(self.part, "weight", 0, self.span, range(len(self.span)))]}

    def extra_repr(self) -> str:
        return f"vocab_span=[{self.span.start}, {self.span.stop}), tied={self.tied}"
