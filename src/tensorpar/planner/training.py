"""Training step time and model FLOPs utilization.

Model FLOPs of a step over ``D`` tokens: ``6 N D`` (forward 2 N D, backward 4 N D, ``N`` the
parameters a token multiplies by) plus attention, ``12 L s q D`` for sequences of length ``s``
(the convention of Korthikanti et al. 2022 and PaLM's MFU). MFU = model FLOPs / (step time *
GPUs * peak).

Time: one micro-batch's forward on each pipeline stage comes from the inference cost model
(``latency``) over ``micro_batch * seq_len`` tokens with the loss on every token. Backward costs
twice the forward's compute and memory time and the same collectives (the conjugate all-reduces,
or all-gather / reduce-scatter pairs of the same volume with sequence parallelism). Full
recomputation repeats the forward; selective recomputation repeats the attention core. With
``m`` micro-batches per step and ``pp`` stages, each stage holding ``v`` model chunks (``v = 1``:
plain 1F1B; ``v > 1``: Megatron's interleaved 1F1B, Narayanan et al. 2021, section 2.2.2), a chunk
takes ``1 / v`` of the stage's time, so the warm-up and cool-down shrink ``v`` times while every
micro-batch crosses ``v`` times as many stage boundaries:

    pipeline   (m + (pp - 1) / v) * (slowest stage's forward + backward + 2 v sends)
    bubble     (pp - 1) / (v m + pp - 1)   (the idle fraction)

(activation memory is counted as for plain 1F1B; interleaving holds somewhat more on the
first stage).
    gradients  all-reduce of float32 gradients over the ``dp`` replicas (not overlapped), across
               nodes when replicas sit on different nodes (sharing the node's inter-node link
               with the other TP x PP groups)
    optimizer  streaming 16 bytes of state per parameter in and out of memory
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tensorpar.planner import comm
from tensorpar.planner.arch import ArchSpec
from tensorpar.planner.costs import Precision, Shard, Step, attention_ops
from tensorpar.planner.hardware import Device
from tensorpar.planner.latency import Breakdown, Placement, op_time, rank_speeds, stage_parts, stage_send_time
from tensorpar.planner.memory import stage_weight_params


def training_flops(params: float, tokens: float) -> float:
    """``6 N D``: forward 2 N D plus backward 4 N D."""
    return 6.0 * params * tokens


def attention_training_flops(layers: int, seq_len: int, q_dim: int, tokens: float) -> float:
    """``12 L s q D``: ``Q K^T`` and ``P V`` over the full sequence, forward and backward."""
    return 12.0 * layers * seq_len * q_dim * tokens


def model_flops(arch: ArchSpec, seq_len: int, tokens: float) -> float:
    return (training_flops(arch.active_params_per_token(), tokens)
            + attention_training_flops(arch.layers, seq_len, arch.q_dim, tokens))


def pipeline_bubble(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle fraction of a (interleaved) 1F1B pipeline step: ``(pp - 1) / (v m + pp - 1)``."""
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)


@dataclass(frozen=True)
class TrainingTime:
    step: float
    pipeline: float
    gradients: float
    optimizer: float
    microbatches: int
    bubble: float
    breakdown: Breakdown


def training_time(arch: ArchSpec, shard: Shard, precision: Precision, device: Device, place: Placement,
                  seq_len: int, micro_batch: int, global_batch: int, recompute: str,
                  distributed_optimizer: bool, virtual_stages: int = 1) -> TrainingTime:
    """One optimizer step (module docstring)."""
    m = global_batch // (place.dp * micro_batch)
    tokens = micro_batch * seq_len
    step = Step(micro_batch, seq_len, (seq_len + 1) / 2, 0)
    parts = stage_parts(arch, shard, step, precision, device, place, logit_rows=tokens)
    speeds = rank_speeds(device, place, precision.weight_dtype)
    attention = sum(op_time(op, tokens, device, speeds)[0] for op in attention_ops(arch, shard, step, precision)
                    if op.kind == "attention")
    stage_times, total = [], Breakdown()
    for i in range(place.pp):
        fwd = parts.stage(i)
        b = Breakdown()
        b.add(fwd)                       # forward
        b.compute += 2 * fwd.compute     # backward: twice the arithmetic and traffic
        b.memory += 2 * fwd.memory
        b.comm += fwd.comm               # ... and the conjugate collectives
        b.collectives += fwd.collectives
        if recompute == "full":
            b.add(fwd)
        elif recompute == "selective":
            b.compute += attention * parts.layers_per_stage[i]
        stage_times.append(b.total)
        total.add(b)
    send = stage_send_time(arch, tokens, precision, device, place)
    v = virtual_stages if place.pp > 1 else 1
    pipeline = (m + (place.pp - 1) / v) * (max(stage_times) + 2 * v * send)
    params = max(stage_weight_params(arch, shard, place.pp))
    nodes = max(1, math.ceil(place.gpus / place.gpus_per_node))
    dp_nodes = nodes if place.dp > 1 and place.gpus > place.gpus_per_node else 1
    gradients = comm.collective_time(comm.ALL_REDUCE, 4.0 * params, place.dp, device, nodes=dp_nodes,
                                     concurrent=min(place.tp * place.pp, place.gpus_per_node))
    optimizer = 2 * 16.0 * params / (device.memory_bandwidth_GBps * 1e9 * device.memory_efficiency)
    return TrainingTime(pipeline + gradients + optimizer, pipeline, gradients, optimizer, m,
                        pipeline_bubble(place.pp, m, v), total)
