"""Every (TP, PP, DP[, EP]) configuration of the GPUs, evaluated; a recommendation and why.

Configurations: every ``tp * pp * dp == gpus`` with ``pp`` at most the number of layers; for
mixture-of-experts models also every expert-parallel degree ``ep`` dividing both ``tp`` and the
number of experts. A configuration is infeasible when a TP group would cross a node boundary
(its per-layer all-reduces would run over the inter-node link), when TP exceeds the query heads
(tensorpar's limit), when the busiest GPU's memory exceeds its capacity, or (training) when the
global batch does not split into micro-batches over the replicas. Degrees that engines with
even head splits refuse are feasible for tensorpar and carry a note.

Recommendation, among feasible configurations that meet the SLOs (``--slo-ttft-ms``,
``--slo-tpot-ms``):

- latency: the lowest time per output token (then time to first token), except that among
  configurations within ``MARGINAL`` (10%) of it the one with the fewest GPUs per replica wins:
  a few percent of latency is not worth twice the GPUs when the rest can serve other replicas;
- throughput: the most output tokens per second over all GPUs;
- cost: the fewest dollars per million output tokens.

Default objective: latency when a latency SLO is given or no objective is named (inference),
throughput for training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tensorpar.planner.arch import ArchSpec
from tensorpar.planner.costs import Precision, busiest_shard, engines_refuse
from tensorpar.planner.engines import Engine
from tensorpar.planner.hardware import GIB, Device
from tensorpar.planner.latency import Breakdown, PhaseTimes, Placement, inference_times
from tensorpar.planner.memory import MemoryUse, inference_memory, training_memory
from tensorpar.planner.training import TrainingTime, model_flops, training_time

MARGINAL = 0.10
OBJECTIVES = ("latency", "throughput", "cost")


@dataclass
class Config:
    """One configuration and what the model predicts for it."""

    tp: int
    pp: int
    dp: int
    ep: int
    feasible: bool = True
    reason: str | None = None
    note: str | None = None
    memory: MemoryUse | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    throughput_tok_s: float | None = None
    usd_per_mtok: float | None = None
    slo_miss: str | None = None
    phases: PhaseTimes | None = None
    training: TrainingTime | None = None
    mfu: float | None = None
    runnable: bool = False  # tensorpar's engine runs this layout for this model
    extra: dict = field(default_factory=dict)

    @property
    def gpus_per_replica(self) -> int:
        return self.tp * self.pp

    @property
    def label(self) -> str:
        parts = [f"TP={self.tp}"]
        if self.pp > 1:
            parts.append(f"PP={self.pp}")
        if self.dp > 1:
            parts.append(f"DP={self.dp}")
        if self.ep > 1:
            parts.append(f"EP={self.ep}")
        return " ".join(parts)

    @property
    def eligible(self) -> bool:
        return self.feasible and self.slo_miss is None

    def flags(self) -> str:
        """The command-line flags of this layout: ``--tp 2 --pp 1`` (and ``--dp N`` above one replica)."""
        return (f"--tp {self.tp} --pp {self.pp}" + (f" --dp {self.dp}" if self.dp > 1 else "")
                + (f" --ep {self.ep}" if self.ep > 1 else ""))

    def to_json(self) -> dict:
        mem = self.memory
        memory = None if mem is None else {
            "weights": round(mem.weights / GIB, 3),
            "kv_cache": round(mem.kv_cache / GIB, 3),
            "activations": round(mem.activations / GIB, 3),
            "total": round(mem.total / GIB, 3),
        }
        reason = self.reason if not self.feasible else (self.slo_miss or self.note)
        out = {"tp": self.tp, "pp": self.pp, "dp": self.dp, "ep": self.ep, "feasible": self.feasible,
               "reason": reason, "memory_gib_per_gpu": memory,
               "ttft_ms": _round(self.ttft_ms), "tpot_ms": _round(self.tpot_ms),
               "throughput_tok_s": _round(self.throughput_tok_s), "usd_per_mtok": _round(self.usd_per_mtok, 4),
               "runnable_by_tensorpar": self.runnable,
               "tensorpar_flags": self.flags() if self.runnable else None}
        out.update(self.extra)
        return out


def _round(x, nd: int = 3):
    return None if x is None else round(x, nd)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_configs(arch: ArchSpec, gpus: int) -> list[Config]:
    out = []
    for tp in divisors(gpus):
        for pp in divisors(gpus // tp):
            if pp > arch.layers:
                continue
            dp = gpus // (tp * pp)
            eps = [e for e in divisors(math.gcd(tp, arch.experts))] if arch.moe else [1]
            out.extend(Config(tp, pp, dp, ep) for ep in eps)
    return out


@dataclass(frozen=True)
class PlanRequest:
    """What ``tensorpar plan`` asks (see ``cli/plan.py`` for each field's meaning)."""

    model: str
    gpu: str
    gpus: int
    nodes: int | None = None
    prompt_len: int = 512
    output_len: int = 128
    batch: int = 1
    dtype: str = "bf16"
    kv_dtype: str | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    objective: str | None = None
    mode: str = "inference"
    global_batch: int = 256
    seq_len: int = 4096
    micro_batch: int = 1
    sequence_parallel: bool = True
    recompute: str = "selective"
    distributed_optimizer: bool = False
    calibrate: str | None = None
    engine: str | None = None
    virtual_stages: int = 1
    speculative_tokens: int = 0  # k drafts per step (``planner.speculative``); 0: no speculative decoding
    acceptance: float = 0.7  # the chance each draft is accepted
    draft: str | None = None  # the draft model (None: n-gram drafts, which cost nothing)
    draft_tp: int | None = None  # its degree (None: the fastest from 1 to the target's TP)


def _structural_reason(arch: ArchSpec, c: Config, gpus_per_node: int, r: PlanRequest) -> str | None:
    if c.tp > arch.heads:
        return f"TP={c.tp} exceeds the {arch.heads} query heads (tensorpar splits heads, not head dimensions)"
    if r.gpus > gpus_per_node and (c.tp > gpus_per_node or gpus_per_node % c.tp):
        nodes = math.ceil(c.tp / gpus_per_node)
        where = f"spans {nodes} nodes" if c.tp > gpus_per_node else f"straddles nodes of {gpus_per_node} GPUs"
        return f"TP={c.tp} {where}: its per-layer all-reduces would cross the inter-node link"
    if r.mode == "training":
        per_step = c.dp * r.micro_batch
        if r.global_batch % per_step:
            return (f"global batch {r.global_batch} does not split into micro-batches of {r.micro_batch} "
                    f"over {c.dp} replicas")
    return None


def _memory_reason(mem: MemoryUse) -> str:
    parts = [f"weights {mem.weights / GIB:.1f}"]
    if mem.optimizer:
        parts.append(f"gradients+optimizer {mem.optimizer / GIB:.1f}")
    if mem.kv_cache:
        parts.append(f"KV cache {mem.kv_cache / GIB:.1f}")
    parts.append(f"activations {mem.activations / GIB:.1f}")
    parts.append(f"runtime {mem.reserve / GIB:.1f}")
    return (f"does not fit: needs {mem.total / GIB:.1f} GiB per GPU ({', '.join(parts)}), "
            f"has {mem.capacity / GIB:.1f} GiB")


def runnable_by_tensorpar(arch: ArchSpec, c: Config, mode: str) -> bool:
    """Whether tensorpar's engine runs ``c`` for ``arch``: dense architectures it has a module for,
    TP x PP x DP for inference (replicas through ``serve --dp``; a mixture of experts also with
    EP dividing TP), TP x DP for training."""
    from tensorpar.models.registry import for_model_type, model_types

    if arch.family not in model_types() or c.tp > arch.heads:
        return False
    if mode == "training":
        return c.pp == 1 and c.ep == 1 and for_model_type(arch.family).trainable
    if c.ep > 1 and (c.tp % c.ep or c.ep > arch.experts):
        return False
    return c.pp <= arch.layers


def evaluate(arch: ArchSpec, device: Device, precision: Precision, gpus_per_node: int,
             r: PlanRequest, c: Config, engine: Engine | None = None, draft: ArchSpec | None = None) -> Config:
    """Fill in memory, times, throughput and cost of one configuration (or why it cannot run)."""
    c.runnable = runnable_by_tensorpar(arch, c, r.mode)
    reason = _structural_reason(arch, c, gpus_per_node, r)
    if reason:
        c.feasible, c.reason = False, reason
        return c
    c.note = engines_refuse(arch, c.tp)
    shard = busiest_shard(arch, c.tp, c.ep)
    place = Placement(c.tp, c.pp, c.dp, c.ep, gpus_per_node)
    dollars_per_s = device.price_per_hour * r.gpus / 3600.0
    if r.mode == "training":
        m = r.global_batch // (c.dp * r.micro_batch)
        c.memory = training_memory(arch, shard, c.tp, c.pp, c.dp, device, place.ranks_per_node, r.seq_len,
                                   r.micro_batch, m, r.sequence_parallel, r.recompute, r.distributed_optimizer)
        c.training = training_time(arch, shard, precision, device, place, r.seq_len, r.micro_batch,
                                   r.global_batch, r.recompute, r.distributed_optimizer, r.virtual_stages)
        tokens = r.global_batch * r.seq_len
        c.throughput_tok_s = tokens / c.training.step
        c.mfu = model_flops(arch, r.seq_len, tokens) / (c.training.step * r.gpus * device.peak_flops(precision.weight_dtype))
        c.extra = {"step_s": round(c.training.step, 4), "mfu": round(c.mfu, 4),
                   "pipeline_bubble": round(c.training.bubble, 4)}
    else:
        m = min(r.batch, c.pp)
        c.memory = inference_memory(arch, shard, c.pp, precision, device, place.ranks_per_node,
                                    math.ceil(r.batch / m), r.batch, r.prompt_len, r.output_len)
        c.phases = inference_times(arch, shard, precision, device, place, r.batch, r.prompt_len, r.output_len,
                                   engine=engine)
        c.ttft_ms = c.phases.ttft * 1e3
        c.tpot_ms = c.phases.tpot * 1e3
        if r.speculative_tokens and c.pp == 1 and (r.draft_tp is None or r.draft_tp <= c.tp):
            from tensorpar.planner.speculative import speculation

            spec = speculation(arch, c.tp, draft, r.draft_tp, r.speculative_tokens, r.acceptance, r.batch,
                               r.prompt_len + r.output_len // 2, precision, device, gpus_per_node, engine)
            c.extra["speculative"] = {**spec.to_json(), "tpot_ms_without": _round(c.tpot_ms)}
            c.tpot_ms = spec.tpot_ms
        request_s = c.phases.ttft + (r.output_len - 1) * c.phases.tpot
        c.throughput_tok_s = c.dp * r.batch * r.output_len / request_s
    c.usd_per_mtok = dollars_per_s / c.throughput_tok_s * 1e6
    if not c.memory.fits:
        c.feasible, c.reason = False, _memory_reason(c.memory)
        c.ttft_ms = c.tpot_ms = c.throughput_tok_s = c.usd_per_mtok = c.mfu = None
        c.phases, c.training, c.extra = None, None, {}
        return c
    misses = []
    if r.slo_ttft_ms is not None and c.ttft_ms is not None and c.ttft_ms > r.slo_ttft_ms:
        misses.append(f"TTFT {c.ttft_ms:.0f} > {r.slo_ttft_ms:g} ms")
    if r.slo_tpot_ms is not None and c.tpot_ms is not None and c.tpot_ms > r.slo_tpot_ms:
        misses.append(f"TPOT {c.tpot_ms:.1f} > {r.slo_tpot_ms:g} ms")
    c.slo_miss = "misses SLO: " + ", ".join(misses) if misses else None
    return c


def _pct(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:.0f}%"


def _ratio_words(larger: int, smaller: int) -> str:
    """How many times ``smaller`` fits in ``larger``, in words: "twice", "three times", "1.5x"."""
    ratio = larger / smaller
    if ratio != int(ratio):
        return f"{ratio:.1f}x"
    return {2: "twice", 3: "three times", 4: "four times"}.get(int(ratio), f"{int(ratio)}x")


def _replica(c: Config) -> str:
    """The configuration of one replica: "TP=4" or "TP=2 PP=2"."""
    parts = [f"TP={c.tp}"] + ([f"PP={c.pp}"] if c.pp > 1 else []) + ([f"EP={c.ep}"] if c.ep > 1 else [])
    return " ".join(parts)


def _replicas(c: Config) -> str:
    """ "two TP=4 replicas (DP=2)", or the single replica."""
    if c.dp == 1:
        return _replica(c)
    count = {2: "two", 3: "three", 4: "four", 8: "eight"}.get(c.dp, str(c.dp))
    return f"{count} {_replica(c)} replicas (DP={c.dp})"


def _decode_story(c: Config) -> str:
    """Where a decode step's time goes."""
    if c.phases is None:
        return ""
    b: Breakdown = c.phases.decode.breakdown
    total = b.total
    if total <= 0:
        return ""
    parts = []
    if b.memory:
        parts.append(f"memory-bound work (weights and KV cache) {b.memory * 1e3:.1f} ms")
    if b.compute:
        parts.append(f"compute-bound work {b.compute * 1e3:.1f} ms")
    if b.comm:
        parts.append(f"{b.collectives} collectives {b.comm * 1e3:.1f} ms")
    if b.overhead:
        parts.append(f"fixed per-layer and per-step overhead {b.overhead * 1e3:.1f} ms")
    fixed = (b.comm + b.overhead) / total
    story = f"A decode step at {_replica(c)}: " + ", ".join(parts) + "."
    if fixed > 0.25:
        story += (f" {100 * fixed:.0f}% of it does not shrink with more TP, which is why decode "
                  f"plateaus as TP grows.")
    return story


def recommend(configs: list[Config], objective: str, mode: str, objective_was_default: bool,
              unit: str = "GPUs") -> tuple[Config | None, str]:
    """The configuration for the objective, and a few sentences on the trade-off (module doc)."""
    feasible = [c for c in configs if c.feasible]
    if not feasible:
        return None, ""
    eligible = [c for c in feasible if c.eligible]
    lines = []
    if objective_was_default:
        why = "throughput (default for training)" if mode == "training" else \
            "latency (default; --objective throughput or cost changes it)"
        lines.append(f"Objective: {why}.")
    else:
        lines.append(f"Objective: {objective}.")
    pool = eligible
    if not eligible:
        pool = feasible
        lines.append("No configuration meets the SLOs; showing the closest.")
    elif len(eligible) < len(feasible):
        missed = [c.label for c in feasible if not c.eligible]
        lines.append(f"{len(missed)} feasible configuration(s) miss the SLOs ({', '.join(missed[:6])}"
                     f"{', ...' if len(missed) > 6 else ''}).")
    if mode == "training":
        best = max(pool, key=lambda c: (c.throughput_tok_s, -c.gpus_per_replica))
        if objective == "cost":
            best = min(pool, key=lambda c: (c.usd_per_mtok, c.gpus_per_replica))
        t = best.training
        lines.append(f"Recommended {best.label}: {best.throughput_tok_s:,.0f} tokens/s, step {t.step:.2f} s, "
                     f"MFU {100 * best.mfu:.0f}%, pipeline bubble {100 * t.bubble:.0f}%, "
                     f"{best.memory.total / GIB:.1f} of {best.memory.capacity / GIB:.1f} GiB per GPU.")
        others = sorted((c for c in pool if c is not best), key=lambda c: -c.throughput_tok_s)[:1]
        for o in others:
            lines.append(f"Next best {o.label}: {o.throughput_tok_s:,.0f} tokens/s "
                         f"({_pct(o.throughput_tok_s, best.throughput_tok_s)}).")
        return best, " ".join(lines)

    if objective == "latency":
        fastest = min(pool, key=lambda c: (c.tpot_ms, c.ttft_ms, c.gpus_per_replica))
        near = [c for c in pool if c.tpot_ms <= fastest.tpot_ms * (1 + MARGINAL)]
        best = min(near, key=lambda c: (c.gpus_per_replica, c.tpot_ms, c.ttft_ms))
        head = (f"Recommended {best.label}: {best.tpot_ms:.1f} ms per output token, "
                f"{best.ttft_ms:.0f} ms to first token, {best.throughput_tok_s:,.0f} tokens/s in all.")
        lines.append(head)
        if best is not fastest:
            cut = (best.tpot_ms - fastest.tpot_ms) / best.tpot_ms
            words = _ratio_words(fastest.gpus_per_replica, best.gpus_per_replica)
            lines.append(f"{_replica(fastest)} would cut decode time by only {100 * cut:.0f}% "
                         f"({best.tpot_ms:.1f} -> {fastest.tpot_ms:.1f} ms/token) at {words} the {unit} per replica; "
                         f"run {_replicas(best)} instead ({best.throughput_tok_s:,.0f} against "
                         f"{fastest.throughput_tok_s:,.0f} tokens/s in all).")
        else:
            smaller = [c for c in pool if c.gpus_per_replica < best.gpus_per_replica]
            if smaller:
                alt = min(smaller, key=lambda c: (c.tpot_ms, -c.gpus_per_replica))
                cut = (alt.tpot_ms - best.tpot_ms) / alt.tpot_ms
                words = _ratio_words(best.gpus_per_replica, alt.gpus_per_replica)
                lines.append(f"It cuts decode time by {100 * cut:.0f}% against {_replica(alt)} "
                             f"({alt.tpot_ms:.1f} -> {best.tpot_ms:.1f} ms/token) with {words} the {unit} per "
                             f"replica; if total throughput matters more than per-request latency, "
                             f"{_replicas(alt)} serve {alt.throughput_tok_s:,.0f} tokens/s against "
                             f"{best.throughput_tok_s:,.0f}.")
        lines.append(_decode_story(best))
        return best, " ".join(x for x in lines if x)

    if objective == "throughput":
        best = max(pool, key=lambda c: (c.throughput_tok_s, -c.tpot_ms))
        lines.append(f"Recommended {best.label}: {best.throughput_tok_s:,.0f} tokens/s over all {unit} "
                     f"({best.tpot_ms:.1f} ms per output token, {best.ttft_ms:.0f} ms to first token).")
    else:
        best = min(pool, key=lambda c: (c.usd_per_mtok, c.tpot_ms))
        lines.append(f"Recommended {best.label}: ${best.usd_per_mtok:.3f} per million output tokens "
                     f"({best.throughput_tok_s:,.0f} tokens/s; {best.tpot_ms:.1f} ms per output token). Every "
                     f"configuration rents the same {unit}, so the cheapest per token is the one with the most "
                     f"tokens/s.")
    fastest = min(pool, key=lambda c: (c.tpot_ms, c.ttft_ms))
    if fastest is not best:
        lines.append(f"The lowest latency is {fastest.label} at {fastest.tpot_ms:.1f} ms/token, but it serves "
                     f"{fastest.throughput_tok_s:,.0f} tokens/s ({_pct(fastest.throughput_tok_s, best.throughput_tok_s)}): "
                     f"each doubling of TP shortens a step by less than it doubles the {unit}, while each extra "
                     f"replica adds a whole batch of tokens per step.")
    lines.append(_decode_story(best))
    return best, " ".join(x for x in lines if x)
