"""The planner: which tensor/pipeline/data-parallel configuration to run a model with, on which
hardware, and why. Pure Python: it imports nothing from ``distributed`` or ``layers`` (nor torch) and
answers in milliseconds.

    from tensorpar.planner import PlanRequest, plan
    result = plan(PlanRequest(model="llama-2-70b", gpu="h100-sxm", gpus=8))
    result.recommended.label, result.explanation

Modules: ``arch`` (model shapes), ``hardware`` (device catalog), ``costs`` (FLOPs and bytes per
operator), ``comm`` (collectives), ``latency`` (roofline, prefill, decode, pipeline), ``memory``
(weights, KV cache, activations), ``training`` (6ND, step time), ``calibrate`` (fit to
``tensorpar bench``), ``gemm`` (tile and wave efficiency), ``engines`` (fixed costs by inference
engine), ``search`` (enumerate, recommend, explain), ``report`` and ``plot``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from tensorpar.dtypes import short_name
from tensorpar.errors import TensorparError
from tensorpar.planner.arch import ArchSpec, resolve_model
from tensorpar.planner.costs import Precision
from tensorpar.planner.engines import Engine, resolve_engine
from tensorpar.planner.hardware import DTYPES, GIB, Device, resolve_device
from tensorpar.planner.memory import RECOMPUTE
from tensorpar.planner.search import OBJECTIVES, Config, PlanRequest, _round, enumerate_configs, evaluate, recommend

MODES = ("inference", "training")


class PlanError(TensorparError):
    """The request makes no sense, or the model fits no configuration of the given GPUs."""


@dataclass
class PlanResult:
    request: PlanRequest
    arch: ArchSpec
    device: Device
    precision: Precision
    gpus_per_node: int
    nodes: int
    objective: str
    configs: list[Config]
    recommended: Config | None
    explanation: str
    calibration: object = None
    notes: list[str] = field(default_factory=list)
    engine: Engine | None = None
    degrades_to: list[dict] = field(default_factory=list)  # ``degradation``: the layouts left as ranks are lost

    def to_json(self) -> dict:
        return {"configs": [c.to_json() for c in self.configs],
                "recommended": self.recommended.to_json() if self.recommended else None,
                "explanation": self.explanation, "degrades_to": self.degrades_to}


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or not math.isfinite(value):
        raise PlanError(f"{name} must be a positive number, got {value!r}")


def _validate(r: PlanRequest) -> None:
    if isinstance(r.gpus, bool) or not isinstance(r.gpus, int) or r.gpus < 1:
        raise PlanError(f"--gpus must be at least 1 (the total number of GPUs to plan for), got {r.gpus!r}")
    if r.nodes is not None:
        if isinstance(r.nodes, bool) or not isinstance(r.nodes, int) or r.nodes < 1:
            raise PlanError(f"--nodes must be at least 1, got {r.nodes!r}")
        if r.gpus % r.nodes:
            raise PlanError(f"--gpus {r.gpus} cannot be spread evenly over --nodes {r.nodes}")
    if r.mode not in MODES:
        raise PlanError(f"--mode must be one of {', '.join(MODES)}, got {r.mode!r}")
    if r.objective is not None and r.objective not in OBJECTIVES:
        raise PlanError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {r.objective!r}")
    for name, value in (("--prompt-len", r.prompt_len), ("--output-len", r.output_len), ("--batch", r.batch),
                        ("--global-batch", r.global_batch), ("--seq-len", r.seq_len),
                        ("--micro-batch", r.micro_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a whole number of at least 1, got {value!r}")
    _positive("--slo-ttft-ms", r.slo_ttft_ms, allow_none=True)
    _positive("--slo-tpot-ms", r.slo_tpot_ms, allow_none=True)
    if r.recompute not in RECOMPUTE:
        raise PlanError(f"--recompute must be one of {', '.join(RECOMPUTE)}, got {r.recompute!r}")
    if isinstance(r.virtual_stages, bool) or not isinstance(r.virtual_stages, int) or r.virtual_stages < 1:
        raise PlanError(f"--virtual-stages must be a whole number of at least 1, got {r.virtual_stages!r}")
    if r.speculative_tokens:
        if isinstance(r.speculative_tokens, bool) or not isinstance(r.speculative_tokens, int) \
                or not 1 <= r.speculative_tokens <= 16 or r.mode != "inference":
            raise PlanError(f"--speculative-tokens must be from 1 to 16, for inference; got {r.speculative_tokens!r}")
        if not isinstance(r.acceptance, (int, float)) or not 0 <= r.acceptance <= 1:
            raise PlanError(f"--acceptance must be a probability from 0 to 1, got {r.acceptance!r}")
        if r.draft_tp is not None and (r.draft is None or not isinstance(r.draft_tp, int) or r.draft_tp < 1):
            raise PlanError(f"--draft-tp must be a whole number of at least 1, with --draft; got {r.draft_tp!r}")
    elif r.draft is not None:
        raise PlanError("--draft needs --speculative-tokens K (drafts per step)")
    if r.mode == "training" and r.dtype in ("fp8", "int8"):
        raise PlanError("training plans use fp32, bf16 or fp16 weights; --dtype fp8/int8 is for inference")


def _layout(r: PlanRequest, device: Device) -> tuple[int, int]:
    """(GPUs per node, nodes) for the request."""
    if r.nodes is not None and r.nodes > 1 and device.inter_node is None:
        raise PlanError(f"{device.name} has no link between nodes; plan for one node (leave out --nodes)")
    if r.nodes is not None:
        gpn = r.gpus // r.nodes
        if gpn > device.gpus_per_node:
            raise PlanError(f"{gpn} GPUs per node (--gpus {r.gpus} over --nodes {r.nodes}) exceeds the "
                            f"{device.gpus_per_node} a {device.name} node holds")
        return gpn, r.nodes
    if r.gpus <= device.gpus_per_node:
        return r.gpus, 1
    if r.gpus % device.gpus_per_node:
        raise PlanError(f"--gpus {r.gpus} does not fill whole nodes of {device.gpus_per_node} x {device.name}; "
                        f"pass --nodes to say how they are spread")
    return device.gpus_per_node, r.gpus // device.gpus_per_node


def _dtypes(r: PlanRequest) -> PlanRequest:
    """``r`` with its dtypes by their short names (any alias of ``tensorpar.dtypes`` is accepted)."""
    try:
        dtype = short_name(r.dtype, DTYPES, "--dtype")
        kv = None if r.kv_dtype is None else short_name(r.kv_dtype, DTYPES, "--kv-dtype")
    except ValueError as e:
        raise PlanError(str(e)) from None
    return replace(r, dtype=dtype, kv_dtype=kv)


LOSSES = 3  # ranks lost in turn that ``degradation`` looks at


def degradation(r: PlanRequest, best: Config) -> list[dict]:
    """What the recommendation becomes as ranks are lost one after another, the model
    re-partitioned over the survivors (at any degree: the heads need not divide): per loss the
    best layout of the GPUs left, its latency and throughput against the full layout's, or why
    nothing fits any more (the chain stops there)."""
    out = []
    for lost in range(1, min(LOSSES, r.gpus - 1) + 1):
        gpus = r.gpus - lost
        try:
            left = plan(replace(r, gpus=gpus, nodes=None), degrade=False).recommended
        except PlanError as e:
            out.append({"gpus": gpus, "layout": None, "reason": str(e)})
            break
        step = {"gpus": gpus, "layout": left.label, "tp": left.tp, "pp": left.pp, "dp": left.dp,
                "tpot_ms": _round(left.tpot_ms), "ttft_ms": _round(left.ttft_ms),
                "throughput_tok_s": _round(left.throughput_tok_s), "reason": None}
        if left.tpot_ms and best.tpot_ms:
            step["tpot_x"] = round(left.tpot_ms / best.tpot_ms, 3)
        if left.throughput_tok_s and best.throughput_tok_s:
            step["throughput_x"] = round(left.throughput_tok_s / best.throughput_tok_s, 3)
        out.append(step)
    return out


def plan(r: PlanRequest, degrade: bool = True) -> PlanResult:
    """Evaluate every configuration of ``r.gpus`` GPUs for ``r.model`` and recommend one; with
    ``degrade``, also what it becomes as ranks are lost (``degradation``)."""
    r = _dtypes(r)
    _validate(r)
    try:
        arch = resolve_model(r.model)
        device = resolve_device(r.gpu)
        engine = resolve_engine(r.engine or ("fitted" if r.calibrate or device.is_cpu else "tensorpar"))
    except ValueError as e:
        raise PlanError(str(e)) from None
    calibration = None
    if r.calibrate:
        from tensorpar.planner.calibrate import calibrate

        try:
            device, calibration = calibrate(device, r.calibrate)
        except ValueError as e:
            raise PlanError(str(e)) from None
    gpn, nodes = _layout(r, device)
    if r.mode == "inference" and r.prompt_len + r.output_len > arch.max_context:
        raise PlanError(f"--prompt-len {r.prompt_len} + --output-len {r.output_len} = {r.prompt_len + r.output_len} "
                        f"tokens exceeds {arch.name}'s context of {arch.max_context}")
    if r.mode == "training" and r.seq_len > arch.max_context:
        raise PlanError(f"--seq-len {r.seq_len} exceeds {arch.name}'s context of {arch.max_context}")
    kv = r.kv_dtype or ("fp32" if r.dtype == "fp32" else "bf16" if r.dtype in ("fp8", "int8") else r.dtype)
    precision = Precision(r.dtype, kv)
    objective = r.objective or ("throughput" if r.mode == "training" else "latency")
    try:
        draft = resolve_model(r.draft) if r.draft else None
    except ValueError as e:
        raise PlanError(f"--draft: {e}") from None
    configs = [evaluate(arch, device, precision, gpn, r, c, engine, draft) for c in enumerate_configs(arch, r.gpus)]
    if not any(c.feasible for c in configs):
        raise PlanError(_fits_nowhere(arch, device, precision, r, configs))
    best, explanation = recommend(configs, objective, r.mode, r.objective is None,
                                  "CPU ranks" if device.is_cpu else "GPUs")
    notes = []
    if best is not None and "speculative" in best.extra:
        notes.append(speculation_note(r, best.extra["speculative"]))
    if device.compute_dtype(r.dtype) != r.dtype:
        notes.append(f"{device.name} has no {r.dtype} matmul rate: {r.dtype} weights are widened to "
                     f"{device.compute_dtype(r.dtype)} for compute (weight-only quantization)")
    return PlanResult(r, arch, device, precision, gpn, nodes, objective, configs, best, explanation,
                      calibration, notes, engine, degradation(r, best) if degrade and best is not None else [])


def speculation_note(r: PlanRequest, s: dict) -> str:
    """What the plan says of speculative decoding on the recommended configuration."""
    k, a = r.speculative_tokens, r.acceptance
    head = (f"speculative decoding, {k} drafts per step accepted with probability {a:g}: {s['tokens_per_step']:.2f} "
            f"tokens per step of {s['verify_ms']:.2f} ms")
    if r.draft is None:
        return f"{head} (n-gram drafts): TPOT {s['tpot_ms_without']:.2f} -> {s['tpot_ms']:.2f} ms"
    steps = ", ".join(f"TP={d} {t:.2f} ms" for d, t in s["draft_ms_by_tp"].items())
    return (f"{head}, plus {k} draft steps of {r.draft} at draft TP={s['draft_tp']} ({steps} a step): TPOT "
            f"{s['tpot_ms_without']:.2f} -> {s['tpot_ms']:.2f} ms")


def _fits_nowhere(arch: ArchSpec, device: Device, precision: Precision, r: PlanRequest, configs: list[Config]) -> str:
    weights = arch.total_params() * precision.weight / GIB
    sized = [c for c in configs if c.memory is not None]
    head = (f"{arch.name} ({arch.total_params() / 1e9:.1f}B parameters, {weights:.0f} GiB of {r.dtype} weights) "
            f"fits no configuration of {r.gpus} x {device.name} ({device.memory_gib:.0f} GiB each)")
    if not sized:
        reasons = sorted({c.reason for c in configs if c.reason})
        return f"{head}: {reasons[0] if reasons else 'no valid configuration'}"
    closest = min(sized, key=lambda c: c.memory.total / c.memory.capacity)
    need = max(1, math.ceil(weights / (device.memory_gib * 0.9)))
    return (f"{head}: the closest, {closest.label}, needs {closest.memory.total / GIB:.1f} GiB per GPU; "
            f"use more GPUs (the weights alone need at least {need} GPUs), a smaller --dtype (fp8, int8), "
            f"a smaller --batch or shorter sequences")
