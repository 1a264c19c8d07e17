"""Column- and row-parallel linear layers.

A layer's local rows (column-parallel) or local input columns (row-parallel) are a list of
*segments*: each one names the checkpoint tensor it comes from (a *part*, such as ``q_proj`` of a
fused QKV projection) and the global span it covers there, or ``None`` for zero padding. Fused
projections (QKV, gate/up) and head-aware padding are then just longer segment lists; the layers
themselves know no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tensorpar.distributed.collectives import (
    SEQ_DIM,
    all_gather_dim,
    copy_to_tp,
    reduce_from_tp,
    reduce_scatter_dim,
    reduce_scatter_seq,
)
from tensorpar.distributed.groups import ParallelContext
from tensorpar.layers import deterministic, deterministic_grads, fused
from tensorpar.layers.pieces import Piece, split_pieces
from tensorpar.layers.quant import linear


@dataclass(frozen=True)
class Segment:
    """``span`` of checkpoint tensor ``part``; ``part=None`` means ``len(span)`` zero entries."""

    part: str | None
    span: range


def use_streaming_layout(weight: torch.Tensor) -> None:
    """Store an [out, in] weight as the transpose of a contiguous [in, out] tensor when out > in.

    The values and the logical shape are unchanged (``F.linear`` sees the same matrix); only the
    memory order changes. For batch-1 decode on CPU, a matrix-vector product over a wide
    [out, in] matrix streams about 1.5-2x as fast from the [in, out] order, while tall or square
    ones prefer [out, in] (BENCHMARKS.md, "Weight layout"). Where the fused products run
    (``layers.fused``), every weight stays [out, in]: they stream that order at the memory floor.
    """
    if fused.available():
        return
    if weight.dim() == 2 and weight.shape[0] > weight.shape[1] and weight.is_contiguous():
        weight.data = weight.data.t().contiguous().t()


class _GatheredLinear(torch.autograd.Function):
    """Y = gather_seq(X) A^T + b that keeps only the local shard of X for the backward pass.

    Backward all-gathers X again for dA = dY^T X and reduce-scatters dX = dY A along the
    sequence: an all-gather more per layer, but the stored input of the column-parallel linear
    shrinks from [B, S, in] to [B, S/p, in] (Korthikanti et al. 2022, section 4.2.2).
    """

    @staticmethod
    def forward(fctx, x, weight, bias, ctx):
        fctx.save_for_backward(x, weight)
        fctx.ctx, fctx.has_bias = ctx, bias is not None
        return F.linear(all_gather_dim(x, ctx, SEQ_DIM), weight, bias)

    @staticmethod
    def backward(fctx, grad):
        x, weight = fctx.saved_tensors
        dt = grad.dtype  # (bfloat16 under autocast, whose forward cast x and A: the products in it, as there)
        full = all_gather_dim(x, fctx.ctx, SEQ_DIM)  # [B, S, in]
        flat = grad.reshape(-1, grad.shape[-1])  # [B*S, out]
        grad_weight = (flat.t() @ full.reshape(-1, full.shape[-1]).to(dt)).to(weight.dtype)
        grad_bias = flat.sum(0).to(weight.dtype) if fctx.has_bias else None
        grad_x = reduce_scatter_dim(grad @ weight.to(dt), fctx.ctx, SEQ_DIM).to(x.dtype)  # [B, S/p, in]
        return grad_x, grad_weight, grad_bias, None


def gathered_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ctx: ParallelContext):
    """[B, S/p, in] sequence shards -> [B, S, out_local]: all-gather, then the local product."""
    if ctx.world_size == 1:
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _GatheredLinear.apply(x, weight, bias, ctx)
    return F.linear(all_gather_dim(x, ctx, SEQ_DIM), weight, bias)


class ColumnParallelLinear(nn.Module):
    """Y = X A + b with A split along its output dimension: A = [A_1, ..., A_p], b = [b_1, ..., b_p].

    Rank i computes Y_i = X A_i + b_i; the output stays sharded (no communication in the forward
    pass; the backward pass all-reduces dX). Local weight: [sum(len(segment)), in_features].
    With ``sequence_parallel`` X arrives split along the sequence and is all-gathered first
    (backward: reduce-scatter of dX).
    """

    sequence_parallel = False
    out_grid: list[tuple[tuple, range]] = []  # deterministic mode: (global chunk, local rows) of each output chunk

    def __init__(
        self, in_features: int, segments: list[Segment], bias: bool, ctx: ParallelContext
    ):
        super().__init__()
        self.ctx = ctx
        self.segments = segments
        self.in_features = in_features
        self.out_features = sum(len(s.span) for s in segments)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] (replicated) or [B, S/p, in] (sequence-parallel) -> [..., out_local]
        if deterministic.enabled() and deterministic_grads.wanted(x, self.weight):
            return deterministic_grads.column(x, self, bias=self.bias)
        if self.sequence_parallel:
            return gathered_linear(x, self.weight, self.bias, self.ctx)
        return linear(copy_to_tp(x, self.ctx), self.weight, self.bias)

    def pieces(self) -> dict[str, list[Piece]]:
        spans = [(s.part, s.span) for s in self.segments]
        out = {"weight": split_pieces(spans, "weight", 0)}
        if self.bias is not None:
            out["bias"] = split_pieces(spans, "bias", 0)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out_local={self.out_features}, bias={self.bias is not None}"


class RowParallelLinear(nn.Module):
    """Y = X A + b with A split along its input dimension: A = [A_1; ...; A_p], X = [X_1, ..., X_p].

    Rank i computes X_i A_i from its shard of X; Y = all-reduce(sum_i X_i A_i) + b, the bias added
    once, after the reduction. Local weight: [out_features, sum(len(segment))]. With
    ``sequence_parallel`` the sum is reduce-scattered along the sequence instead (backward:
    all-gather of dY), and b is added to this rank's sequence shard.
    """

    sequence_parallel = False
    reduce = True  # False: return the partial sum X_i A_i, for the caller to reduce (no bias then)
    grid: list[tuple[int, range]] = []  # deterministic mode: (global chunk, local columns) of each chunk held

    def __init__(
        self, segments: list[Segment], out_features: int, bias: bool, ctx: ParallelContext
    ):
        super().__init__()
        self.ctx = ctx
        self.segments = segments
        self.in_features = sum(len(s.span) for s in segments)
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_local] (sharded) -> [..., out] (replicated) or [B, S/p, out] (sequence-parallel)
        if deterministic.enabled() and self.reduce:
            if deterministic_grads.wanted(x, self.weight):
                return deterministic_grads.row(x, self)
            if not self.sequence_parallel:
                return deterministic.grid_product(x, self)
        y = linear(x, self.weight)
        if not self.reduce:
            return y
        if self.sequence_parallel:
            y = reduce_scatter_seq(y, self.ctx)
            return y + self.bias if self.bias is not None else y
        return self.finish(y)

    def finish(self, partial: torch.Tensor) -> torch.Tensor:
        """The partial sum X_i A_i -> Y: all-reduce, then the bias."""
        y = reduce_from_tp(partial, self.ctx)
        return y + self.bias if self.bias is not None else y

    def pieces(self) -> dict[str, list[Piece]]:
        out = {"weight": split_pieces([(s.part, s.span) for s in self.segments], "weight", 1)}
        if self.bias is not None:
            (part,) = {s.part for s in self.segments if s.part is not None}
            out["bias"] = [Piece(part, "bias")]
        return out

    def extra_repr(self) -> str:
        return f"in_local={self.in_features}, out={self.out_features}, bias={self.bias is not None}"
