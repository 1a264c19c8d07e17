"""A device mesh: ``tp`` x ``pp`` x ``dp`` ranks, tensor-parallel groups inside pipeline stages
inside data-parallel replicas (training); inference passes its stages as the second axis.

Global rank ``r`` sits at ``dp_rank = r // (tp * pp)``, ``pp_rank = r // tp % pp``,
``tp_rank = r % tp``: the ranks of one tensor-parallel group are adjacent (on one host first,
where their frequent collectives are cheapest); rank ``tp_rank`` of every stage of a replica forms
its pipeline group; rank ``(pp_rank, tp_rank)`` of every replica forms a data-parallel group.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch.distributed as dist

from tensorpar.distributed.groups import DEFAULT_TIMEOUT_S, ParallelContext, single_process_context


@dataclass(frozen=True)
class Mesh:
    world: ParallelContext
    tp: ParallelContext
    dp: ParallelContext
    pp: ParallelContext | None = None  # (None: one stage)


def mesh_coordinates(rank: int, tp: int) -> tuple[int, int]:
    """(dp_rank, tp_rank) of global ``rank``."""
    return divmod(rank, tp)


def build_mesh(world: ParallelContext, tp: int, dp: int, timeout_s: float = DEFAULT_TIMEOUT_S, pp: int = 1) -> Mesh:
    """Split ``world`` into tensor-parallel groups of ``tp``, pipeline groups of ``pp`` and
    data-parallel groups of ``dp``.

    Every rank creates every group, in the same order (``new_group`` is collective). Groups on
    one host get their own shared-memory communicator when the world has one; pipeline groups
    carry point-to-point sends, on the world's backend.
    """
    if tp < 1 or dp < 1 or pp < 1 or tp * pp * dp != world.world_size:
        raise ValueError(f"tp ({tp}) x pp ({pp}) x dp ({dp}) must equal the number of ranks ({world.world_size})")
    if world.world_size == 1:
        return Mesh(world, world, world)
    replica, tp_rank = mesh_coordinates(world.rank, tp)
    dp_rank, pp_rank = divmod(replica, pp)

    def rank(d: int, s: int, t: int) -> int:
        return (d * pp + s) * tp + t

    layouts = {"tp": [[rank(d, s, t) for t in range(tp)] for d in range(dp) for s in range(pp)],
               "pp": [[rank(d, s, t) for s in range(pp)] for d in range(dp) for t in range(tp)] if pp > 1 else [],
               "dp": [[rank(d, s, t) for d in range(dp)] for s in range(pp) for t in range(tp)]}
    mine = {}
    for kind, groups in layouts.items():
        for ranks in groups:
            group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s))
            if world.rank in ranks:
                mine[kind] = (group, ranks)

    def context(kind: str, size: int, rank: int) -> ParallelContext:
        if size == 1:
            return single_process_context(world.device)
        if size == world.world_size:
            return world
        group, _ = mine[kind]
        return _subgroup_context(world, group, rank, size, timeout_s)

    # the shared-memory set-up is collective over each group: tensor-parallel groups first
    tp_ctx = context("tp", tp, tp_rank)
    dp_ctx = context("dp", dp, dp_rank)
    pp_ctx = None
    if pp > 1:
        group, ranks = mine["pp"]
        pp_ctx = world if pp == world.world_size else ParallelContext(
            rank=pp_rank, world_size=pp, device=world.device, group=group,
            backend="gloo" if world.shm is not None else world.backend)
    return Mesh(world, tp_ctx, dp_ctx, pp_ctx)


def destroy_mesh(mesh: Mesh) -> None:
    """Close the subgroups' shared-memory segments (the world's own is closed with the world)."""
    for ctx in (mesh.tp, mesh.dp, mesh.pp):
        if ctx is not None and ctx is not mesh.world and ctx.shm is not None:
            ctx.shm.close()


def leading_context(world: ParallelContext, size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelContext | None:
    """A group of ``world``'s first ``size`` ranks (a speculative draft model's): its context on
    them, None on the others. Collective over ``world`` (``new_group`` is)."""
    if not 1 <= size <= world.world_size:
        raise ValueError(f"a group of {size} ranks within {world.world_size}")
    if size == world.world_size:
        return world
    if size == 1:
        return single_process_context(world.device) if world.rank == 0 else None
    group = dist.new_group(list(range(size)), timeout=datetime.timedelta(seconds=timeout_s))
    return _subgroup_context(world, group, world.rank, size, timeout_s) if world.rank < size else None


def _subgroup_context(world: ParallelContext, group, rank: int, size: int, timeout_s: float) -> ParallelContext:
    """This rank's context in ``group``, a subgroup of ``world``, with its own shared-memory
    communicator when the world has one (its set-up is collective over the group)."""
    shm = None
    if world.shm is not None:
        from tensorpar.distributed.shm import create_group_communicator

        shm = create_group_communicator(rank, size, group, timeout_s)
    backend = world.backend if shm is not None or world.shm is None else "gloo"
    return ParallelContext(rank=rank, world_size=size, device=world.device, backend=backend, group=group, shm=shm)
