"""Starting ranks, one way for every command: ``launch`` joins the group ``torchrun`` set up, stays
in this process for one rank, or spawns N local processes (``distributed/ranks.py``: the ``Ranks``
it returns; ``distributed/host.py``: each rank's device, cores and threads).

Each rank runs one *worker*, ``factory(ctx, *args)``; ``Ranks.call(method, ...)`` runs
``worker.method(...)`` on every rank and returns rank 0's result. Under torchrun the user's
program runs on every rank, so ``call`` runs the method here and every rank makes the same calls.

This is the only module that reads the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``; ``MASTER_ADDR``/``MASTER_PORT`` are read by ``env://``). Spawned ranks are
supervised: if any rank dies or raises, the others are stopped and the caller gets one
``RankFailure`` naming the rank that failed first and why.
"""

from __future__ import annotations

from contextlib import contextmanager

import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tensorpar.distributed import DEFAULT_TIMEOUT_S
from tensorpar.distributed.host import configure_rank_process, rank_device
from tensorpar.distributed.ranks import Factory, InProcessRanks, Ranks, SpawnedRanks, build_worker
from tensorpar.errors import TensorparError

if TYPE_CHECKING:
    from tensorpar.distributed.groups import ParallelContext


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int = 1


def torchrun_env() -> TorchrunEnv | None:
    """The rank layout ``torchrun`` exported, or None when not launched by it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    return TorchrunEnv(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


def join_torchrun(
    env: TorchrunEnv, device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S, use_shm: bool = True,
    group_size: int | None = None,
) -> "ParallelContext":
    """Join this rank's group: torchrun's whole world, or (``group_size`` smaller than it) the
    ``group_size`` adjacent ranks of this one, as a process group of their own on torchrun's store."""
    from tensorpar.distributed.groups import init_group

    device = rank_device(device_type, env.local_rank)
    if not group_size or group_size == env.world_size:
        return init_group(env.rank, env.world_size, "env://", device, timeout_s, use_shm)
    import torch.distributed as dist

    store = dist.PrefixStore(f"tensorpar/group{env.rank // group_size}/", torchrun_store(env, timeout_s))
    return init_group(env.rank % group_size, group_size, None, device, timeout_s, use_shm, store=store)


def torchrun_store(env: TorchrunEnv, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A client of the key-value store torchrun's ranks share (``MASTER_ADDR:MASTER_PORT``): the
    agent's store, or, when torchrun does not host one, the one rank 0 hosts."""
    import datetime

    import torch.distributed as dist

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=env.rank == 0 and not agent_store, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def torchrun_host_address() -> str:
    """This host's address on the interface that reaches torchrun's store (loopback when the
    store is on this host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
        return s.getsockname()[0]




def launch(
    world_size: int,
    factory: Factory | None = None,
    args: tuple = (),
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    use_shm: bool = True,
    leader_here: bool = False,
    replicas: int = 1,
    cores: tuple[int, int | None] = (0, None),
    step_thread: bool = False,
) -> Ranks:
    """Bring up ``world_size`` ranks, each running ``factory(ctx, *args)`` (or no worker yet, for
    ``rebuild`` to give them one: ranks kept for one model after another).

    ``factory`` has one form: a class (or function) defined at the top level of a module, such as
    ``Worker`` (``LLM``, serving) or ``Trainer`` (training). Spawned ranks receive it pickled, that
    is by its module and name, and import it themselves, so it must be importable by name: no
    lambda, closure or bound method (``args`` are pickled too). Passing the class itself, not a
    string naming it, lets a reader, and any tool that follows imports, go from the caller to the
    code the ranks run.

    Under torchrun this process joins its group (``world_size`` must be torchrun's; the caller
    has checked) and builds its own worker. One rank runs in this process. Otherwise the ranks
    are spawned; with ``leader_here`` this process is rank 0 (its worker is ``ranks.local``) and
    only ranks 1..N-1 are spawned, building their workers while this one builds its own.

    ``replicas``: under torchrun, its world holds that many independent groups of ``world_size``
    ranks (data-parallel replicas; replica ``d`` is ranks ``d * world_size ...``), and this process
    joins its replica's group (``ranks.replica`` says which); elsewhere it is ignored (each replica
    on this host is launched by its own leader). ``cores``: see ``SpawnedRanks``.

    ``step_thread``: the worker here will be stepped on another thread (a server's engine thread).
    This thread then builds it with one compute thread, so that it never forms an OpenMP team of its
    own: beside the stepping thread's team, a second one makes the same kernels about 20% slower
    on 2 cores (BENCHMARKS.md, issue 30). ``ranks.compute_threads`` is the share the stepping
    thread takes (``take_compute_threads``).
    """
    device_type = device.split(":")[0]
    env = torchrun_env()
    if env is not None:
        from tensorpar.distributed import groups  # (torch: imported by the processes that are ranks, once they are)

        if env.world_size != world_size * replicas:
            raise TensorparError(f"{world_size * replicas} ranks were asked for, but torchrun started {env.world_size}")
        ctx = join_torchrun(env, device_type, timeout_s, use_shm, world_size)
        try:
            with _threads_for(step_thread) as threads:
                ranks = InProcessRanks(build_worker(factory, ctx, args), ctx, owns_group=True,
                                       replica=env.rank // world_size)
            ranks.compute_threads = threads
            return ranks
        except BaseException:
            groups.destroy_group(ctx)
            raise
    if world_size == 1:
        from tensorpar.distributed import groups

        if cores[1]:  # one of several single-rank groups on this host
            configure_rank_process(cores[0], cores[1], spawned=False)
        ctx = groups.single_process_context(device)
        with _threads_for(step_thread) as threads:
            ranks = InProcessRanks(build_worker(factory, ctx, args), ctx, owns_group=False)
        ranks.compute_threads = threads
        return ranks
    if device_type == "cuda":
        import torch

        if torch.cuda.device_count() < world_size:
            raise TensorparError(f"{world_size} ranks on CUDA need {world_size} GPUs; "
                                 f"{torch.cuda.device_count()} visible")
    ranks = SpawnedRanks(world_size, factory, args, device_type, timeout_s, use_shm, leader_here=leader_here,
                         cores=cores)
    if not leader_here:
        return ranks
    try:
        from tensorpar.distributed import groups

        configure_rank_process(cores[0], cores[1] or world_size, spawned=False)
        ranks.ctx = groups.init_group(0, world_size, ranks.init_method, rank_device(device_type, 0), timeout_s, use_shm)
        with _threads_for(step_thread) as ranks.compute_threads:
            ranks.local = build_worker(factory, ranks.ctx, args)
        ranks.wait_ready()
    except BaseException:
        failure = ranks.failure()
        ranks.close(force=True)
        if failure is not None:
            raise failure from None
        raise
    return ranks


@contextmanager
def _threads_for(step_thread: bool):
    """Yields this thread's compute-thread count (None when not ``step_thread``); with
    ``step_thread``, this thread computes on one thread from then on (see ``launch``)."""
    if not step_thread:
        yield None
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (and so it stays: this thread now serves, the stepping one computes)
    yield threads


def take_compute_threads(ranks) -> None:
    """On the thread that steps a worker ``launch(step_thread=True)`` built: its share of the cores."""
    threads = getattr(ranks, "compute_threads", None)
    if threads:
        import torch

        torch.set_num_threads(threads)
