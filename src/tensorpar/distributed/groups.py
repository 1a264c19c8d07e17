"""Process groups and the per-rank parallel context that is passed down to every layer."""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tensorpar.distributed import DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class ParallelContext:
    """Where this rank stands: its rank and group, and the device its tensors live on.

    ``group`` is ``None`` for a single process, where every collective returns at once.
    ``shm`` is the shared-memory communicator that CPU collectives use when every rank of the
    group is on this host (``backend`` then reads ``"shm+gloo"``; gloo still carries the rare
    object collectives). ``control_group`` is a gloo group over the same ranks beside an NCCL
    ``group``: the control channel that step messages travel on (``collectives.broadcast_control``);
    None where ``group`` is a CPU group already.
    """

    rank: int
    world_size: int
    device: torch.device
    backend: str
    group: dist.ProcessGroup | None = None
    shm: object | None = None
    control_group: dist.ProcessGroup | None = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def single_process_context(device: str | torch.device = "cpu") -> ParallelContext:
    """A context of one rank with no process group (TP=1 pays for no machinery)."""
    return ParallelContext(rank=0, world_size=1, device=torch.device(device), backend="none")


def choose_backend(device: torch.device) -> str:
    """NCCL when each rank drives its own CUDA device, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_group(
    rank: int,
    world_size: int,
    init_method: str | None,
    device: torch.device,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    use_shm: bool = True,
    store=None,
) -> ParallelContext:
    """Join the default process group (at ``init_method``, or on ``store``); every collective on
    it fails after ``timeout_s`` seconds.

    On CPU, when every rank runs on this host, collectives go through shared memory.
    """
    if dist.is_initialized():
        from tensorpar.errors import TensorparError

        raise TensorparError("this process already belongs to a process group: one tensor-parallel engine per process")
    backend = choose_backend(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **({"device_id": device} if backend == "nccl" else {}),
    )
    shm = control = None
    if backend == "nccl":
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "gloo" and use_shm:
        from tensorpar.distributed import shm as shm_module

        hosts = [None] * world_size
        dist.all_gather_object(hosts, (socket.gethostname(), shm_module.available()))
        if all(h == hosts[0] for h in hosts) and hosts[0][1]:
            shm = shm_module.create_group_communicator(rank, world_size, dist.group.WORLD, timeout_s)
            backend = "shm+gloo" if shm is not None else backend
    return ParallelContext(
        rank=rank, world_size=world_size, device=device, backend=backend, group=dist.group.WORLD, shm=shm,
        control_group=control,
    )


def destroy_group(ctx: ParallelContext) -> None:
    if ctx.shm is not None:
        ctx.shm.close()
    if ctx.group is not None and dist.is_initialized():
        dist.destroy_process_group()
