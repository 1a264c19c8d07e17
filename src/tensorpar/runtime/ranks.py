"""Bringing up the ranks of one engine: join torchrun's group, stay in one process, or spawn.

The one place that decides how ``LLM`` and ``ServingEngine`` get their ranks, so that both
validate the same things before any process starts.
"""

from __future__ import annotations

from typing import Callable

import torch

from tensorpar.distributed.groups import ParallelContext, init_group, single_process_context
from tensorpar.distributed.launch import (
    SpawnedRanks,
    configure_rank_process,
    join_torchrun,
    rank_device,
    torchrun_env,
)
from tensorpar.errors import TensorparError
from tensorpar.loading import open_source
from tensorpar.models.config import ModelConfig
from tensorpar.partition import check_degree
from tensorpar.runtime.engine import EngineSpec, make_engine

COMMS = ("auto", "gloo")


def start_ranks(
    spec: EngineSpec,
    tp: int,
    timeout_s: float,
    comm: str,
    leader_here: bool,
    check: Callable[[ModelConfig], None] | None = None,
) -> tuple[ModelConfig, ParallelContext | None, SpawnedRanks | None]:
    """Validate the request, then bring up ``tp`` ranks.

    Returns the model's config, this process's context (None when every rank was spawned), and
    the spawned ranks (None when none were). Under ``torchrun`` this process joins its group. With
    ``leader_here`` the caller's process is rank 0 and only ranks 1..tp-1 are spawned; they build
    their engines while this one joins (the caller then calls ``ranks.wait_ready()``). ``check``
    validates the caller's own settings against the config before anything starts.
    """
    if comm not in COMMS:
        raise ValueError(f"comm must be 'auto' (shared memory between local CPU ranks) or 'gloo', got {comm!r}")
    spec.torch_dtype()  # an unknown dtype fails before anything starts
    config = open_source(spec.model).config
    if check is not None:
        check(config)
    use_shm = comm == "auto"
    device_type = spec.device.split(":")[0]
    env = torchrun_env()
    if env is not None:
        if tp not in (1, env.world_size):
            raise TensorparError(f"--tp {tp} does not match torchrun's world size {env.world_size}")
        check_degree(env.world_size, config.num_heads)
        return config, join_torchrun(env, device_type, timeout_s, use_shm), None
    check_degree(tp, config.num_heads)
    if tp == 1:
        return config, single_process_context(spec.device), None
    if device_type == "cuda" and torch.cuda.device_count() < tp:
        raise TensorparError(f"--tp {tp} on CUDA needs {tp} GPUs; {torch.cuda.device_count()} visible")
    ranks = SpawnedRanks(tp, make_engine, (spec,), device_type, timeout_s, use_shm, leader_here=leader_here)
    if not leader_here:
        return config, None, ranks
    configure_rank_process(0, tp, spawned=False)
    ctx = init_group(0, tp, ranks.init_method, rank_device(device_type, 0), timeout_s, use_shm)
    return config, ctx, ranks
