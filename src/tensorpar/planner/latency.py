"""Time of a forward step, of prefill (time to first token) and of decode (time per output token).

Each operator takes the longer of its compute time and its memory time (a roofline):

    t_op = max(FLOPs / (R * M / (M + n_1/2) * e(M, N, K)),  bytes / (bandwidth * memory_efficiency))

``R`` is the achievable matmul rate of the compute dtype (``Device.matmul_flops``: 16-bit peak x
``matmul_efficiency``, 8-bit peak x ``low_precision_efficiency``), ``M`` the matmul's rows and
``e`` the tile and wave efficiency of its per-rank shape (``gemm``). The attention core runs at
``Device.attention_flops`` (16-bit, whatever the weights); memory-bound operators have no FLOP
term. A decoder layer adds its two TP all-reduces (``comm``; an engine's own small-message
all-reduce where it has one) and a fixed per-layer overhead, and each forward step a fixed step
overhead, both from the engine profile (``engines``). A pipeline stage is its layers, plus the
embedding on the first stage and the LM head on the last.

Pipeline with ``pp`` stages of times ``t_i`` and a batch cut into ``m = min(batch, pp)``
micro-batches (``s`` = one stage-to-stage send):

    prefill (time to first token)   sum_i t_i + (pp - 1) s + (m - 1) max_i t_i
    decode (time per output token)  max(sum_i t_i + pp s, m max_i t_i)

i.e. a micro-batch's token has to pass every stage, and the slowest stage has to serve all ``m``
micro-batches once per token; with ``m < pp`` stages sit idle (the pipeline bubble,
``1 - m / pp`` of the time).

CPU ranks: a rank has ``cores // ranks`` threads (at least one); kernels with fewer rows than
``parallel_min_rows`` run on one of them; the host's memory bandwidth is shared by the cores in
use. When ``R`` ranks outnumber the ``C`` cores, they share the cores (each runs ``R / C`` times
slower), and the ``tp`` ranks of a group, which must meet at every collective, cannot all run at
once: each stretch between collectives takes ``ceil(tp / C)`` times as long. The slowdown is the
larger of the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tensorpar.partition import even_splits
from tensorpar.planner import comm
from tensorpar.planner.arch import ArchSpec
from tensorpar.planner.costs import (
    Comm,
    Op,
    Precision,
    Shard,
    Step,
    decode_step,
    embedding_ops,
    head_ops,
    layer_ops,
    prefill_step,
)
from tensorpar.planner.engines import Engine
from tensorpar.planner.gemm import shape_efficiency
from tensorpar.planner.hardware import Device


@dataclass(frozen=True)
class Placement:
    """A configuration on hardware: its degrees and how many GPUs (or CPU ranks) a node holds."""

    tp: int
    pp: int
    dp: int
    ep: int
    gpus_per_node: int

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def ranks_per_node(self) -> int:
        return min(self.gpus, self.gpus_per_node)

    @property
    def tp_nodes(self) -> int:
        return max(1, math.ceil(self.tp / self.gpus_per_node))

    @property
    def pp_crosses_nodes(self) -> bool:
        return self.tp * self.pp > self.gpus_per_node


@dataclass
class Breakdown:
    """Seconds by cause: compute-bound operators, memory-bound operators, collectives, fixed
    per-layer overhead; and the number of collectives."""

    compute: float = 0.0
    memory: float = 0.0
    comm: float = 0.0
    overhead: float = 0.0
    collectives: int = 0

    @property
    def total(self) -> float:
        return self.compute + self.memory + self.comm + self.overhead

    def add(self, other: "Breakdown", times: int = 1) -> None:
        self.compute += other.compute * times
        self.memory += other.memory * times
        self.comm += other.comm * times
        self.overhead += other.overhead * times
        self.collectives += other.collectives * times


@dataclass(frozen=True)
class Speeds:
    """What one rank gets under a placement: threads, the lockstep factor of oversubscribed CPU
    ranks, and the achievable FLOP/s of one thread (or GPU) for matmuls in the compute dtype and
    for attention."""

    threads: int
    lockstep: float
    oversubscribed: bool
    matmul_flops: float
    busy_cores: int
    attention_flops: float
    memory_efficiency: float
    weight_memory_efficiency: float
    attention_memory_efficiency: float | None = None
    half_rows: float | None = None


def rank_speeds(device: Device, place: Placement, weight_dtype: str, engine: Engine | None = None) -> Speeds:
    """The engine's memory efficiency replaces the device's where it states one; matmuls over
    8-bit weights stream them at ``int8_weight_efficiency`` of that (dequantization); an engine's
    ``bandwidth_per_sm_GBps`` caps every streaming efficiency at that rate times the SMs."""
    mm, attn = device.matmul_flops(weight_dtype), device.attention_flops()
    mem = device.memory_efficiency
    if engine is not None and engine.memory_efficiency is not None:
        mem = engine.memory_efficiency
    weights = mem * (engine.int8_weight_efficiency if engine is not None and weight_dtype in ("fp8", "int8") else 1.0)
    kv = engine.attention_memory_efficiency if engine is not None else None
    half = engine.gemm_half_rows if engine is not None else None
    if engine is not None and engine.bandwidth_per_sm_GBps is not None and device.sm_count:
        cap = engine.bandwidth_per_sm_GBps * device.sm_count / device.memory_bandwidth_GBps
        mem, weights, kv = min(mem, cap), min(weights, cap), min(mem if kv is None else kv, cap)
    if not device.is_cpu:
        return Speeds(1, 1, False, mm, 1, attn, mem, weights, kv, half)
    ranks = place.ranks_per_node
    threads = max(1, device.cores // ranks)
    slowdown = max(ranks / device.cores, math.ceil(min(place.tp, ranks) / device.cores))
    return Speeds(threads, slowdown, ranks > device.cores, mm, min(ranks * threads, device.cores), attn, mem, weights,
                  kv, half)


def op_time(op: Op, tokens: int, device: Device, speeds: Speeds) -> tuple[float, bool]:
    """(seconds, compute-bound?) of one operator on one rank (module docstring)."""
    threads = speeds.threads if tokens >= device.parallel_min_rows else 1
    bandwidth = device.memory_bandwidth_GBps * 1e9 * threads
    if device.node_memory_bandwidth_GBps is not None:
        bandwidth = min(bandwidth, device.node_memory_bandwidth_GBps * 1e9 * threads / speeds.busy_cores)
    efficiency = speeds.weight_memory_efficiency if op.kind == "matmul" else speeds.memory_efficiency
    if op.kind == "attention" and speeds.attention_memory_efficiency is not None:
        efficiency = speeds.attention_memory_efficiency
    t_mem = op.bytes / (bandwidth * efficiency)
    if op.kind == "memory" or op.flops == 0:
        return t_mem, False
    if op.kind == "matmul":
        half = device.gemm_half_rows if speeds.half_rows is None else speeds.half_rows
        rate = speeds.matmul_flops * threads * op.rows / (op.rows + half)
        rate *= shape_efficiency(op.rows, op.n, op.k, device.sm_count, op.groups)
    else:
        rate = speeds.attention_flops * threads
    t_flop = op.flops / rate
    return (t_flop, True) if t_flop >= t_mem else (t_mem, False)


def ops_time(ops: list[Op], comms: list[Comm], tokens: int, device: Device, speeds: Speeds,
             place: Placement, engine: Engine | None = None) -> Breakdown:
    b = Breakdown()
    for op in ops:
        t, compute_bound = op_time(op, tokens, device, speeds)
        if compute_bound:
            b.compute += t * speeds.lockstep
        else:
            b.memory += t * speeds.lockstep
    for c in comms:
        b.comm += comm.collective_time(c.op, c.nbytes, place.tp, device, nodes=place.tp_nodes,
                                       oversubscribed=speeds.oversubscribed, engine=engine)
        b.collectives += 1
    return b


@dataclass
class StepTime:
    """One forward step of one replica: each stage's time, the sum by cause, the send between
    stages, and the micro-batches the batch was cut into."""

    stages: list[float]
    breakdown: Breakdown
    send: float
    microbatches: int

    @property
    def slowest(self) -> float:
        return max(self.stages)

    @property
    def through_all(self) -> float:
        """One micro-batch through every stage."""
        return sum(self.stages) + (len(self.stages) - 1) * self.send


@dataclass(frozen=True)
class StageParts:
    """One forward step on one rank, by part: a decoder layer, the embedding (first stage), the
    final norm and LM head (last stage), and how many layers each stage holds."""

    layer: Breakdown
    first: Breakdown
    last: Breakdown
    layers_per_stage: tuple

    def stage(self, i: int) -> Breakdown:
        b = Breakdown()
        b.add(self.layer, self.layers_per_stage[i])
        if i == 0:
            b.add(self.first)
        if i == len(self.layers_per_stage) - 1:
            b.add(self.last)
        return b


def layer_overhead_s(device: Device, engine: Engine | None) -> float:
    """Fixed seconds per decoder layer per step: the engine's, else the device's."""
    if engine is not None and engine.layer_overhead_us is not None:
        return engine.layer_overhead_us * 1e-6
    return device.layer_overhead_us * 1e-6


def stage_parts(arch: ArchSpec, shard: Shard, step: Step, precision: Precision, device: Device,
                place: Placement, logit_rows: int, engine: Engine | None = None) -> StageParts:
    speeds = rank_speeds(device, place, precision.weight_dtype, engine)
    kv_reads = engine.kv_reads(shard.q_slots / shard.kv_heads, precision.kv_dtype) if engine is not None else 1.0
    layer = ops_time(*layer_ops(arch, shard, step, precision, kv_reads), step.tokens, device, speeds, place, engine)
    layer.overhead += layer_overhead_s(device, engine) * speeds.lockstep
    first = ops_time(*embedding_ops(arch, shard, step, precision), step.tokens, device, speeds, place, engine)
    if engine is not None:
        first.overhead += (engine.step_overhead_us + (place.tp - 1) * engine.step_overhead_per_rank_us) * 1e-6
    last = ops_time(*head_ops(arch, shard, step, precision, logit_rows), step.tokens, device, speeds, place, engine)
    counts = tuple(len(r) for r in even_splits(arch.layers, place.pp))
    return StageParts(layer, first, last, counts)


def stage_send_time(arch: ArchSpec, tokens: int, precision: Precision, device: Device, place: Placement) -> float:
    """Activations of ``tokens`` tokens handed from one pipeline stage to the next."""
    if place.pp == 1:
        return 0.0
    return comm.send_time(tokens * arch.hidden * precision.act, device, place.pp_crosses_nodes)


def step_time(arch: ArchSpec, shard: Shard, step: Step, precision: Precision, device: Device,
              place: Placement, logit_rows: int, microbatches: int = 1, engine: Engine | None = None) -> StepTime:
    """Stage times of a forward step over ``step`` (one micro-batch of it); the engine's step
    overhead is paid on the first stage."""
    parts = stage_parts(arch, shard, step, precision, device, place, logit_rows, engine)
    total, stages = Breakdown(), []
    for i in range(place.pp):
        b = parts.stage(i)
        stages.append(b.total)
        total.add(b)
    send = stage_send_time(arch, step.tokens, precision, device, place)
    return StepTime(stages, total, send, microbatches)


@dataclass(frozen=True)
class PhaseTimes:
    """Prefill and decode of one replica."""

    ttft: float
    tpot: float
    prefill: StepTime
    decode: StepTime

    @property
    def bubble(self) -> float:
        """Fraction of decode time a stage sits idle."""
        pp = len(self.decode.stages)
        return 1.0 - self.decode.microbatches / pp if pp > 1 else 0.0


def inference_times(arch: ArchSpec, shard: Shard, precision: Precision, device: Device, place: Placement,
                    batch: int, prompt: int, output: int, engine: Engine | None = None) -> PhaseTimes:
    """Time to first token and time per output token (module docstring) under ``engine``'s fixed
    costs (none: the device's per-layer overhead only); the engine's ``prefill_overhead_us`` is
    paid once per request (per batch of requests prefilled together), on the first token. Decode is taken at the mean context of
    the generation, ``prompt + output / 2``."""
    m = min(batch, place.pp)
    mb = math.ceil(batch / m)
    pre = step_time(arch, shard, prefill_step(mb, prompt), precision, device, place, logit_rows=mb, microbatches=m,
                    engine=engine)
    ttft = pre.through_all + (m - 1) * pre.slowest + (engine.prefill_overhead_us * 1e-6 if engine is not None else 0.0)
    context = prompt + max(1, output) // 2
    dec = step_time(arch, shard, decode_step(mb, context), precision, device, place, logit_rows=mb, microbatches=m,
                    engine=engine)
    tpot = max(dec.through_all + (place.pp > 1) * dec.send, m * dec.slowest)
    return PhaseTimes(ttft, tpot, pre, dec)
