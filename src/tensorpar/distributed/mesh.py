"""A 2-D device mesh: ``tp`` x ``dp`` ranks, tensor-parallel groups inside data-parallel replicas
(training), or inside pipeline stages (inference: the second axis is then the stage).

Global rank ``r`` sits at ``dp_rank = r // tp``, ``tp_rank = r % tp``: the ranks of one
tensor-parallel group are adjacent (on one host first, where their frequent collectives are
cheapest); rank ``tp_rank`` of every replica forms a data-parallel group.
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


def mesh_coordinates(rank: int, tp: int) -> tuple[int, int]:
    """(dp_rank, tp_rank) of global ``rank``."""
    return divmod(rank, tp)


def build_mesh(world: ParallelContext, tp: int, dp: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> Mesh:
    """Split ``world`` into tensor-parallel groups of ``tp`` and data-parallel groups of ``dp``.

    Every rank creates every group, in the same order (``new_group`` is collective). Groups on
    one host get their own shared-memory communicator when the world has one.
    """
    if tp < 1 or dp < 1 or tp * dp != world.world_size:
        raise ValueError(f"tp ({tp}) x dp ({dp}) must equal the number of ranks ({world.world_size})")
    if world.world_size == 1:
        return Mesh(world, world, world)
    dp_rank, tp_rank = mesh_coordinates(world.rank, tp)
    layouts = [[d * tp + t for t in range(tp)] for d in range(dp)]  # tensor-parallel groups
    layouts += [[d * tp + t for d in range(dp)] for t in range(tp)]  # data-parallel groups
    mine = {}
    for ranks in layouts:
        group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s))
        if world.rank in ranks:
            mine["tp" if ranks == layouts[dp_rank] else "dp"] = (group, ranks)

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
    return Mesh(world, tp_ctx, dp_ctx)


def destroy_mesh(mesh: Mesh) -> None:
    """Close the subgroups' shared-memory segments (the world's own is closed with the world)."""
    for ctx in (mesh.tp, mesh.dp):
        if ctx is not mesh.world and ctx.shm is not None:
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
