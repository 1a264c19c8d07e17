"""Thin, named collectives over a tensor-parallel group, and their autograd pairs.

Raw collectives return at once on a group of one. The autograd functions come in conjugate pairs
(Megatron-Core's ``mappings.py``):

- ``copy_to_tp``  (forward: identity,   backward: all-reduce)  pairs with
  ``reduce_from_tp`` (forward: all-reduce, backward: identity).
- ``gather_from_tp`` (forward: all-gather along the last dim, backward: split) pairs with
  ``scatter_to_tp``  (forward: split,                           backward: all-gather).
- ``gather_seq`` (forward: all-gather along the sequence dim, backward: reduce-scatter) pairs with
  ``reduce_scatter_seq`` (forward: reduce-scatter,            backward: all-gather): the two
  sides of a sequence-parallel region (Korthikanti et al. 2022, the g / g-bar operators).

Outside autograd (inference under ``torch.no_grad``) the pairs call the raw collective directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tensorpar.distributed.groups import ParallelContext


def all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum ``x`` over the group in place and return it."""
    if ctx.world_size == 1:
        return x
    if ctx.shm is not None and x.device.type == "cpu":
        return ctx.shm.all_reduce(x)
    dist.all_reduce(x, group=ctx.group)
    return x


def all_reduce_max(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Element-wise maximum of ``x`` over the group, in place."""
    if ctx.world_size == 1:
        return x
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=ctx.group)
    return x


def all_gather_dim(x: torch.Tensor, ctx: ParallelContext, dim: int) -> torch.Tensor:
    """Concatenate equal-shaped ``x`` from every rank along ``dim``.

    [..., n, ...] -> [..., world_size * n, ...]
    """
    if ctx.world_size == 1:
        return x
    if ctx.shm is not None and x.device.type == "cpu":
        return torch.cat(ctx.shm.all_gather(x).unbind(0), dim=dim)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x, group=ctx.group)
    return torch.cat(parts, dim=dim)


def all_gather_last(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """[..., n] -> [..., world_size * n]: ``all_gather_dim`` along the last dimension."""
    return all_gather_dim(x, ctx, -1)


def gather(x: torch.Tensor, ctx: ParallelContext, dst: int = 0) -> torch.Tensor | None:
    """Equal-shaped ``x`` of every rank stacked on rank ``dst``: [world_size, *x.shape]; None elsewhere."""
    if ctx.world_size == 1:
        return x.unsqueeze(0)
    if ctx.shm is not None and x.device.type == "cpu":
        return ctx.shm.gather(x, dst)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)] if ctx.rank == dst else None
    dist.gather(x, parts, dst=dist.get_global_rank(ctx.group, dst), group=ctx.group)
    return None if parts is None else torch.stack(parts)


def split_dim(x: torch.Tensor, ctx: ParallelContext, dim: int) -> torch.Tensor:
    """This rank's equal slice of ``dim``. [..., world_size * n, ...] -> [..., n, ...]"""
    if ctx.world_size == 1:
        return x
    return x.chunk(ctx.world_size, dim=dim)[ctx.rank].contiguous()


def split_last(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """[..., world_size * n] -> [..., n]: ``split_dim`` along the last dimension."""
    return split_dim(x, ctx, -1)


def reduce_scatter_dim(x: torch.Tensor, ctx: ParallelContext, dim: int) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's equal slice of ``dim``.

    [..., world_size * n, ...] -> [..., n, ...]. NCCL reduce-scatters directly; gloo has no
    reduce-scatter, so CPU groups all-reduce and slice (twice the traffic of a true one).
    """
    if ctx.world_size == 1:
        return x
    if ctx.backend == "nccl":
        front = x.movedim(dim, 0).contiguous()  # [world_size * n, ...]
        out = torch.empty_like(front.chunk(ctx.world_size, dim=0)[ctx.rank])
        dist.reduce_scatter_tensor(out, front, group=ctx.group)
        return out.movedim(0, dim)
    return split_dim(all_reduce(x.clone(), ctx), ctx, dim)


def all_to_all(x: torch.Tensor, rows: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Variable-sized all-to-all of rows: ``rows`` [world, world] (known to every rank) says how
    many rows rank p sends rank q; ``x`` [sum_q rows[rank, q], ...] holds this rank's rows grouped
    by destination, in rank order. Returns [sum_p rows[p, rank], ...]: the rows sent here, grouped
    by sender in rank order.
    """
    if ctx.world_size == 1:
        return x
    x = x.contiguous()
    if ctx.shm is not None and x.device.type == "cpu":
        return ctx.shm.all_to_all(x, rows)
    send, recv = rows[ctx.rank].tolist(), rows[:, ctx.rank].tolist()
    out = x.new_empty(sum(recv), *x.shape[1:])
    dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=ctx.group)
    return out


def broadcast(x: torch.Tensor, ctx: ParallelContext, src: int = 0) -> torch.Tensor:
    """Overwrite ``x`` on every rank with rank ``src``'s ``x``."""
    if ctx.world_size == 1:
        return x
    if ctx.shm is not None and x.device.type == "cpu":
        return ctx.shm.broadcast(x, src)
    dist.broadcast(x, src=dist.get_global_rank(ctx.group, src), group=ctx.group)
    return x


def broadcast_control(x: torch.Tensor, ctx: ParallelContext, src: int = 0) -> torch.Tensor:
    """``broadcast`` of a CPU tensor on the control channel: shared memory or gloo on CPU groups,
    the group's gloo companion (``ParallelContext.control_group``) beside NCCL, so that what a step
    is never waits on, nor syncs with, a device."""
    if ctx.world_size == 1:
        return x
    if ctx.shm is not None:
        return ctx.shm.broadcast(x, src)
    group = ctx.control_group if ctx.control_group is not None else ctx.group
    dist.broadcast(x, src=dist.get_global_rank(group, src), group=group)
    return x


def send(x: torch.Tensor, ctx: ParallelContext, dst: int) -> None:
    """Point-to-point: ``x`` to rank ``dst`` of ``ctx``'s group (pipeline stages pass activations so)."""
    dist.send(x.contiguous(), dst=dist.get_global_rank(ctx.group, dst), group=ctx.group)


def isend(x: torch.Tensor, ctx: ParallelContext, dst: int):
    """``send`` without waiting: returns the work to ``wait()`` on (keep ``x`` alive until then)."""
    return dist.isend(x, dst=dist.get_global_rank(ctx.group, dst), group=ctx.group)


def recv(x: torch.Tensor, ctx: ParallelContext, src: int) -> torch.Tensor:
    """Point-to-point: fill ``x`` from rank ``src`` of ``ctx``'s group. A peer that sends nothing
    within the group's timeout is a ``RankFailure`` naming it (a stage that stopped answering)."""
    try:
        dist.recv(x, src=dist.get_global_rank(ctx.group, src), group=ctx.group)
    except RuntimeError as e:
        if "timed out" not in str(e).lower():
            raise
        from tensorpar.errors import RankFailure

        raise RankFailure(src, ctx.world_size, "did not answer: receiving from it timed out") from None
    return x


def broadcast_object(obj, ctx: ParallelContext, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(ctx.group, src), group=ctx.group)
    return box[0]


def all_gather_object(obj, ctx: ParallelContext) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.group)
    return out


SEQ_DIM = 1  # activations are [batch, sequence, hidden]


def _identity(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return x


def _gather_seq(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return all_gather_dim(x, ctx, SEQ_DIM)


def _reduce_scatter_seq(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return reduce_scatter_dim(x, ctx, SEQ_DIM)


def _conjugate(name: str, forward, backward) -> type:
    """An autograd function computing ``forward(x, ctx)`` whose gradient is ``backward(grad, ctx)``."""

    def fwd(fctx, x, ctx):
        fctx.ctx = ctx
        return forward(x, ctx)

    def bwd(fctx, grad):
        return backward(grad, fctx.ctx), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


# Each pair's backward is the other's forward (the module docstring lists them).
_CopyToTP = _conjugate("_CopyToTP", _identity, lambda grad, ctx: all_reduce(grad.contiguous(), ctx))
_ReduceFromTP = _conjugate("_ReduceFromTP", lambda x, ctx: all_reduce(x.clone(), ctx), _identity)
_GatherFromTP = _conjugate("_GatherFromTP", all_gather_last, split_last)
_ScatterToTP = _conjugate("_ScatterToTP", split_last, all_gather_last)
_GatherSeq = _conjugate("_GatherSeq", _gather_seq, _reduce_scatter_seq)
_ReduceScatterSeq = _conjugate("_ReduceScatterSeq", _reduce_scatter_seq, _gather_seq)


def _paired(name: str, function, raw, doc: str):
    """The collective ``name``: the autograd ``function`` under autograd, the ``raw`` collective
    otherwise, nothing on a group of one."""

    def collective(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
        if ctx.world_size == 1:
            return x
        if torch.is_grad_enabled() and x.requires_grad:
            return function.apply(x, ctx)
        return raw(x, ctx)

    collective.__name__ = collective.__qualname__ = name
    collective.__doc__ = doc
    return collective


copy_to_tp = _paired("copy_to_tp", _CopyToTP, _identity, "identity forward, all-reduce backward")
reduce_from_tp = _paired("reduce_from_tp", _ReduceFromTP, all_reduce, "all-reduce forward, identity backward")
gather_from_tp = _paired("gather_from_tp", _GatherFromTP, all_gather_last,
                         "[..., n] -> [..., p n] forward (all-gather), split backward")
scatter_to_tp = _paired("scatter_to_tp", _ScatterToTP, split_last,
                        "[..., p n] -> [..., n] forward (this rank's slice), all-gather backward")
gather_seq = _paired("gather_seq", _GatherSeq, _gather_seq,
                     "[B, S/p, ...] -> [B, S, ...]; enters a tensor-parallel region from a sequence-parallel one")
reduce_scatter_seq = _paired("reduce_scatter_seq", _ReduceScatterSeq, _reduce_scatter_seq,
                             "[B, S, ...] partial sums -> [B, S/p, ...] summed; leaves a tensor-parallel region")
