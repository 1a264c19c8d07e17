"""Fit the device model to what ``tensorpar bench`` measured on the machine at hand.

``bench.json`` holds, for one model and dtype, decode ms/token at several batch sizes and
prefill time of a long prompt for each TP degree, the memory read bandwidth with one thread and
with every core, and a sweep of collectives (latency per message size and world size). From it:

1. measured directly: cores, memory, per-core and all-core read bandwidth;
2. collectives: for each op and world size, ``time = alpha + bytes * factor / busbw`` (factor
   ``2 (n - 1) / n`` for all-reduce, ``(n - 1) / n`` for all-gather) by least squares on
   relative error over every message size of the sweep, for the backend the TP runs used
   (shared memory where available, else gloo); the smallest world size also sets the link used
   for sizes that were not measured, and the extra latency at world sizes beyond the core count
   sets the oversubscription latency;
3. fitted together over every decode and prefill row: four parameters of the device model,
   ``memory_efficiency``, ``matmul_efficiency``, ``gemm_half_rows`` and ``layer_overhead_us``,
   minimizing the sum of squared log errors (Nelder-Mead in log space). Four parameters for all
   rows, never one per row.

The result is the device with those values; ``CalibrationReport`` lists each row's prediction
against its measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tensorpar.dtypes import ENGINE_DTYPES, short_name
from tensorpar.planner.arch import ArchSpec, resolve_model
from tensorpar.planner.costs import Precision, busiest_shard, decode_step, prefill_step
from tensorpar.planner.hardware import Device, Link, MeasuredCollective
from tensorpar.planner.jsonfile import read_json_object
from tensorpar.planner.latency import Placement, step_time

FITTED = ("memory_efficiency", "matmul_efficiency", "gemm_half_rows", "layer_overhead_us")
BOUNDS = {"memory_efficiency": (0.02, 1.0), "matmul_efficiency": (0.02, 1.0), "gemm_half_rows": (0.5, 4096.0),
          "layer_overhead_us": (0.1, 20000.0)}


@dataclass(frozen=True)
class Row:
    """One measurement: ``kind`` "decode" (ms per token at ``batch``) or "prefill" (ms for one
    ``prompt``-token prompt)."""

    kind: str
    tp: int
    batch: int
    prompt: int
    output: int
    measured_ms: float
    predicted_ms: float = 0.0

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1.0


@dataclass(frozen=True)
class CalibrationReport:
    source: str
    model: str
    dtype: str
    backend: str
    params: dict
    rows: tuple
    collectives: tuple


def load_bench(path: str) -> dict:
    data = read_json_object(path, "calibration file")
    missing = [k for k in ("machine", "settings", "tensorpar") if k not in data]
    if missing:
        raise ValueError(f"calibration file {path!r} is not a tensorpar bench result (no {', '.join(missing)}); "
                         f"write one with `tensorpar bench`")
    return data


def fit_collective(points: list[tuple[float, float]], factor: float) -> tuple[float, float]:
    """Least squares on relative error of ``t = alpha + bytes * factor / busbw`` -> (alpha_s, busbw_Bps)."""
    # minimize sum ((alpha + x beta) / t - 1)^2 with x = bytes * factor: weighted normal equations
    s11 = s12 = s22 = r1 = r2 = 0.0
    for nbytes, t in points:
        w = 1.0 / (t * t)
        x = nbytes * factor
        s11 += w
        s12 += w * x
        s22 += w * x * x
        r1 += w * t
        r2 += w * x * t
    det = s11 * s22 - s12 * s12
    if det <= 0:
        raise ValueError("collective sweep has too few message sizes to fit")
    alpha = (r1 * s22 - r2 * s12) / det
    beta = (s11 * r2 - s12 * r1) / det
    if beta <= 0:  # bandwidth term not resolved: latency only
        return sum(t for _, t in points) / len(points), float("inf")
    if alpha < 0:  # refit bandwidth with alpha = 0
        alpha = 0.0
        beta = sum(x * factor * t / (t * t) for x, t in points) / sum((x * factor) ** 2 / (t * t) for x, _ in points)
    return alpha, 1.0 / beta


def measured_collectives(data: dict, backend: str) -> list[MeasuredCollective]:
    groups: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for c in data.get("collectives") or []:
        if c.get("backend") != backend or not c.get("latency_us") or c.get("correct") is False:
            continue
        op = c.get("collective") or c.get("op", "").split(".")[-1]
        op = "all_gather" if op.startswith("all_gather") else op
        groups.setdefault((op, int(c["world_size"])), []).append((float(c["bytes"]), float(c["latency_us"]) * 1e-6))
    out = []
    for (op, n), pts in sorted(groups.items()):
        if len(pts) < 2:
            continue
        factor = 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n
        alpha, busbw = fit_collective(pts, factor)
        out.append(MeasuredCollective(op, n, alpha * 1e6, busbw / 1e9 if math.isfinite(busbw) else 1e6))
    return out


def bench_rows(data: dict) -> list[Row]:
    s = data["settings"]
    short = int(s.get("short_prompt_tokens", 16))
    new = int(s.get("new_tokens", 32))
    prompt = int(s.get("prompt_len", 512))
    rows = []
    for r in data["tensorpar"]:
        if r.get("status", "ok") != "ok" or int(r.get("pp", 1)) > 1 or int(r.get("dp", 1)) > 1 or int(r.get("ep", 1)) > 1:  # (the fit is of TP degrees)
            continue
        tp = int(r["tp"])
        for b, ms in sorted((r.get("decode_ms_per_token") or {}).items(), key=lambda kv: int(kv[0])):
            rows.append(Row("decode", tp, int(b), short, new, float(ms)))
        if r.get("prefill_s"):
            rows.append(Row("prefill", tp, 1, int(r.get("prompt_len", prompt)), 1, float(r["prefill_s"]) * 1e3))
    if not rows:
        raise ValueError("calibration file has no successful tensorpar rows to fit")
    return rows


def predict(arch: ArchSpec, device: Device, precision: Precision, row: Row, gpus_per_node: int) -> float:
    """Predicted ms of a bench row: a decode step at the mean context, or a whole prefill."""
    shard = busiest_shard(arch, row.tp)
    place = Placement(row.tp, 1, 1, 1, gpus_per_node)
    if row.kind == "decode":
        step = decode_step(row.batch, row.prompt + row.output // 2)
    else:
        step = prefill_step(row.batch, row.prompt)
    return step_time(arch, shard, step, precision, device, place, logit_rows=row.batch).through_all * 1e3


def nelder_mead(f, x0: list[float], step: float = 0.4, iterations: int = 160) -> list[float]:
    """Minimize ``f`` from ``x0`` (a small, dependency-free Nelder-Mead)."""
    n = len(x0)
    simplex = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(iterations):
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        centroid = [sum(p[j] for p in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]
        reflect = [c + (c - w) for c, w in zip(centroid, worst)]
        fr = f(reflect)
        if fr < values[0]:
            expand = [c + 2 * (c - w) for c, w in zip(centroid, worst)]
            fe = f(expand)
            simplex[-1], values[-1] = (expand, fe) if fe < fr else (reflect, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflect, fr
        else:
            contract = [c + 0.5 * (w - c) for c, w in zip(centroid, worst)]
            fc = f(contract)
            if fc < values[-1]:
                simplex[-1], values[-1] = contract, fc
            else:
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (p - b) for b, p in zip(best, pt)] for pt in simplex[1:]]
                values = [values[0]] + [f(p) for p in simplex[1:]]
    return simplex[min(range(n + 1), key=values.__getitem__)]


def calibrate(base: Device, path: str) -> tuple[Device, CalibrationReport]:
    """``base`` refined by the measurements in the bench result at ``path`` (module docstring)."""
    data = load_bench(path)
    machine, settings = data["machine"], data["settings"]
    try:
        arch = resolve_model(str(settings.get("model", "")))
    except ValueError as e:
        raise ValueError(f"calibration file {path!r}: its model cannot be read ({e})") from None
    dtype = short_name(str(settings.get("dtype", "fp32")), ENGINE_DTYPES, "bench dtype")
    precision = Precision(dtype, dtype)
    device = base
    if base.is_cpu:
        cores = int(machine.get("cores") or machine.get("cpu_count") or base.cores)
        kw = {"cores": cores}
        if machine.get("memory_mib"):
            kw["memory_gib"] = float(machine["memory_mib"]) / 1024
        roof = data.get("roofline") or {}
        one = (roof.get("bandwidth_1_thread") or {}).get("read_GBps")
        every = (roof.get("bandwidth_all_cores") or {}).get("read_GBps")
        if one:
            kw["memory_bandwidth_GBps"] = float(one)
        if every:
            kw["node_memory_bandwidth_GBps"] = float(every)
        device = replace(device, **kw)
    backends = {str(r.get("backend", "")) for r in data["tensorpar"] if int(r.get("tp", 1)) > 1}
    backend = "shm" if any("shm" in b for b in backends) else "gloo"
    measured = measured_collectives(data, backend)
    if measured:
        reduces = sorted((m for m in measured if m.op == "all_reduce"), key=lambda m: m.world_size)
        kw = {"measured_collectives": tuple(measured)}
        if reduces:
            small = reduces[0]
            kw["intra_node"] = Link(small.busbw_GBps, small.alpha_us, 0.0, 1.0)
            cores = device.cores or 0
            inside = [m for m in reduces if m.world_size <= cores] if device.is_cpu else []
            beyond = [m for m in reduces if m.world_size > cores] if device.is_cpu else []
            if inside and beyond:
                kw["oversubscribed_latency_us"] = max(0.0, beyond[0].alpha_us - inside[-1].alpha_us)
        device = replace(device, **kw)
    rows = bench_rows(data)
    gpn = device.gpus_per_node

    def params_of(x: list[float]) -> dict:
        out = {}
        for name, v in zip(FITTED, x):
            lo, hi = BOUNDS[name]
            out[name] = min(hi, max(lo, math.exp(v)))
        return out

    def loss(x: list[float]) -> float:
        dev = replace(device, **params_of(x))
        return sum(math.log(predict(arch, dev, precision, r, gpn) / r.measured_ms) ** 2 for r in rows)

    x0 = [math.log(getattr(device, name)) for name in FITTED]
    best = params_of(nelder_mead(loss, x0))
    device = replace(device, **best, source=f"calibrated from {path}")
    fitted_rows = tuple(replace(r, predicted_ms=predict(arch, device, precision, r, gpn)) for r in rows)
    report = CalibrationReport(path, arch.name, dtype, backend, best, fitted_rows, tuple(measured))
    return device, report
