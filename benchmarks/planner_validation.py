"""Predictions of ``tensorpar plan``'s model against published measurements (docs/planner-validation.md).

    .venv/bin/python benchmarks/planner_validation.py [--calibration-dir ../shared/calibration]
    .venv/bin/python benchmarks/planner_validation.py --fit      # refit the fitted constants

Prints the markdown of docs/planner-validation.md (below its introduction). The rows are in
``benchmarks/planner_validation/{inference,training}.csv``, each with its source. A row is held
out when ``crc32(row id) % 3 == 0`` (the id joins source, model, device, dtype, degrees, batch,
lengths and metric); that rule was fixed before anything was fitted, and ``--fit`` reads only
the other rows. Fitted on those: the engine profiles' constants (``planner/engines.py``) and the
catalog's ``low_precision_efficiency``; the collective constants come from the NCCL profiles in
``shared/calibration``; everything else is datasheets and published efficiencies. Errors are on
time (predicted time / measured time - 1, throughput and MFU inverted), so a negative error is an
optimistic prediction whatever the metric.
"""

from __future__ import annotations

import argparse
import csv
import math
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from tensorpar.planner.arch import ArchSpec, from_hf_config, resolve_model
from tensorpar.planner.calibrate import nelder_mead
from tensorpar.planner.comm import collective_time
from tensorpar.planner.costs import Precision, busiest_shard
from tensorpar.planner.engines import ENGINES
from tensorpar.planner.hardware import (
    BUILTIN_DEVICES,
    DTYPE_BYTES,
    LOW_PRECISION_EFFICIENCY,
    NVLINK3_LATENCY_PER_RANK_US,
    NVLINK3_LATENCY_US,
    NVLINK3_RING_EFFICIENCY,
    NVLINK_LATENCY_PER_RANK_US,
    NVLINK_LATENCY_US,
    RING_EFFICIENCY,
    Link,
)
from tensorpar.planner.latency import Placement, inference_times
from tensorpar.planner.training import model_flops, training_time

ROOT = Path(__file__).resolve().parents[1]



def _gpt(name: str, vocab: int, h: int, layers: int, heads: int):
    return from_hf_config(dict(model_type="gpt2", vocab_size=vocab, n_embd=h, n_layer=layers, n_head=heads,
                               n_positions=2048), name=name)


# Models of the rows that are not built in (their published shapes).
CUSTOM_MODELS = {
    "qwq-32b": from_hf_config(dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                                   num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                                   max_position_embeddings=40960, use_sliding_window=False), name="qwq-32b"),
    "ft-13b": _gpt("ft-13b", 50272, 5120, 40, 40),                  # kipply's 13B GPT
    "gpt-22b": _gpt("gpt-22b", 51200, 6144, 48, 64),                # Korthikanti et al. table 3
    "gpt3-175b-megatron": _gpt("gpt3-175b-megatron", 51200, 12288, 96, 96),
    "gpt-530b": _gpt("gpt-530b", 51200, 20480, 105, 128),
    "gpt-1t": _gpt("gpt-1t", 51200, 25600, 128, 160),
    # EleutherAI/gpt-j-6b config.json: 28 layers of 16 heads x 256, a 4x GELU MLP, rotary positions
    "gpt-j-6b": ArchSpec("gpt-j-6b", "gptj", hidden=4096, layers=28, heads=16, kv_heads=16, head_dim=256,
                         ffn=16384, vocab=50400, max_context=2048, gated_mlp=False, layer_norm=True),
    # tiiuae/falcon-180B config.json: 80 layers of 232 query heads x 64 and 8 KV heads, a 4x GELU MLP
    "falcon-180b": ArchSpec("falcon-180b", "falcon", hidden=14848, layers=80, heads=232, kv_heads=8, head_dim=64,
                            ffn=4 * 14848, vocab=65024, max_context=2048, gated_mlp=False, layer_norm=True),
}


def err(pred: float, meas: float) -> str:
    return f"{100 * (pred / meas - 1):+.0f}%"


# --- communication ---------------------------------------------------------------------------------


def load_vidur(path: Path) -> list[tuple[int, int, int, float]]:
    """(world size, devices per node, bytes, median seconds)."""
    with open(path) as f:
        return [(int(r["num_workers"]), int(r["devices_per_node"]), int(r["size"]),
                 float(r["time_stats.all_reduce.median"]) * 1e-3) for r in csv.DictReader(f)]


def solve3(a, b):
    """Solve a 3x3 linear system (Cramer's rule)."""
    def det(m):
        return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
    d = det(a)
    out = []
    for i in range(3):
        m = [row[:] for row in a]
        for r in range(3):
            m[r][i] = b[r]
        out.append(det(m) / d)
    return out


def fit_profile(rows) -> tuple[float, float, float]:
    """t = a0 + a1 (n - 1) + 2 (n - 1) / n * S / busbw on every >= 1 MiB row, relative least squares."""
    big = [(n, s, t) for n, d, s, t in rows if s >= 1 << 20 and n == d]
    ata = [[0.0] * 3 for _ in range(3)]
    atb = [0.0] * 3
    for n, s, t in big:
        x = [1.0 / t, (n - 1) / t, 2 * (n - 1) / n * s / t]
        for i in range(3):
            atb[i] += x[i]
            for j in range(3):
                ata[i][j] += x[i] * x[j]
    a0, a1, inv = solve3(ata, atb)
    return a0, a1, 1.0 / inv


def comm_tables(cal: Path) -> list[str]:
    h100 = load_vidur(cal / "vidur_h100_dgx_all_reduce.csv")
    a100 = load_vidur(cal / "vidur_a100_dgx_all_reduce.csv")
    a0, a1, busbw = fit_profile(h100)
    b0, b1, bbw = fit_profile(a100)
    out = ["### The fits (every message >= 1 MiB of one node, 2, 4 and 8 GPUs together)", "",
           f"- NVLink 4 (DGX-H100 file): alpha(n) = {a0 * 1e6:.1f} us + {a1 * 1e6:.2f} us x (n - 1); bus bandwidth "
           f"{busbw / 1e9:.0f} GB/s = {busbw / 450e9:.3f} x the 450 GB/s NVLink. The catalog's H100 and H200 use "
           f"{NVLINK_LATENCY_US} us, {NVLINK_LATENCY_PER_RANK_US} us and {RING_EFFICIENCY}.",
           f"- NVLink 3 (DGX-A100 file): alpha(n) = {b0 * 1e6:.1f} us + {b1 * 1e6:.2f} us x (n - 1); bus bandwidth "
           f"{bbw / 1e9:.0f} GB/s = {bbw / 300e9:.3f} x the 300 GB/s NVLink. The catalog's A100 uses "
           f"{NVLINK3_LATENCY_US} us and {NVLINK3_LATENCY_PER_RANK_US} us from this fit, and bus bandwidth "
           f"{NVLINK3_RING_EFFICIENCY} x 300 GB/s from nccl-tests (200-233 GB/s published; this profile's "
           f"{bbw / 1e9:.0f} GB/s is below every published figure).", ""]

    ring_h100 = replace(BUILTIN_DEVICES["h100-sxm"], intra_node=replace(BUILTIN_DEVICES["h100-sxm"].intra_node, sharp=False))
    a100_dev = BUILTIN_DEVICES["a100-80gb-sxm"]
    # vidur's A100 cluster: inter-node bandwidth assumed 1x HDR 200G per node (about 25 GB/s)
    a100_cluster = replace(a100_dev, inter_node=Link(25.0, 45.0, 0.5, 0.9))

    def table(rows, device, label):
        groups = {}
        for n, d, s, t in rows:
            groups.setdefault((n, d), []).append((s, t))
        lines = []
        for (n, d), pts in sorted(groups.items()):
            nodes = n // d
            big = [(s, t) for s, t in pts if s >= 1 << 20]
            small = [(s, t) for s, t in pts if s <= 256 * 1024]
            errs = sorted(abs(collective_time("all_reduce", s, n, device, nodes=nodes) / t - 1) for s, t in big)
            med_small = sorted(t for _, t in small)[len(small) // 2]
            pred_small = collective_time("all_reduce", 64 * 1024, n, device, nodes=nodes)
            s64 = max(s for s, _ in pts)
            t64 = [t for s, t in pts if s == s64][0]
            p64 = collective_time("all_reduce", s64, n, device, nodes=nodes)
            lines.append(f"| {label} | {n} GPUs, {nodes} node(s) | {100 * errs[len(errs) // 2]:.0f}% / "
                         f"{100 * sum(errs) / len(errs):.0f}% | {t64 * 1e3:.3f} | {p64 * 1e3:.3f} | {err(p64, t64)} | "
                         f"{med_small * 1e6:.0f} | {pred_small * 1e6:.0f} | {err(pred_small, med_small)} |")
        return lines

    out += ["### All-reduce time, predicted against measured (vidur NCCL profiles)", "",
            "| file | group | >= 1 MiB rows: median / mean abs error | 64 MiB measured ms | predicted ms | error "
            "| <= 256 KiB median measured us | predicted us (64 KiB) | error |", "|---|---|---|---|---|---|---|---|---|"]
    out += table(h100, ring_h100, "H100 (fitted here)")
    out += table(a100, a100_cluster, "A100 (latency fitted here, bandwidth from nccl-tests)")
    out += ["", "### Published nccl-tests bus bandwidth (large messages) against the model", "",
            "| hardware | published busbw GB/s | model GB/s | error | source |", "|---|---|---|---|---|"]
    h100 = BUILTIN_DEVICES["h100-sxm"]
    link = h100.intra_node

    def nvls_busbw(n, lk):
        return lk.sharp_efficiency * lk.bandwidth_GBps * 2 * (n - 1) / n

    rows = [
        ("8x H100 SXM, ring", 367.5, link.efficiency * link.bandwidth_GBps, "NVIDIA/nccl issue 1455 (365-370)"),
        ("8x H100 SXM, NVLS, 5 GPUs", 420, nvls_busbw(5, link), "NVIDIA/nccl issue 1455"),
        ("8x H100 SXM, NVLS, 8 GPUs", 480, nvls_busbw(8, link), "NVIDIA/nccl issue 1455"),
        ("8x H200", 475, nvls_busbw(8, BUILTIN_DEVICES["h200-sxm"].intra_node), "NVIDIA/nccl-tests issue 272"),
        ("8x A100 SXM", 216.5, a100_dev.intra_node.efficiency * a100_dev.intra_node.bandwidth_GBps,
         "NVIDIA/nccl-tests issues 149, 175 (200-233)"),
        ("2 nodes DGX-A100, 8x 200G IB", 192, min(a100_dev.intra_node.efficiency * 300,
                                                  a100_dev.inter_node.efficiency * a100_dev.inter_node.bandwidth_GBps),
         "NVIDIA/nccl issue 1576"),
    ]
    for name, pub, model, src in rows:
        out.append(f"| {name} | {pub:g} | {model:.0f} | {err(model, pub)} | {src} |")
    mi = BUILTIN_DEVICES["mi300x"]
    out += ["", "### 8x MI300X: AMD's RCCL acceptance table against the model", "",
            "ROCm/system-acceptance-docs `docs/mi300x/performance-bench.rst` (commit bd8360c22c), rccl-tests "
            "`all_reduce_perf -b 8 -e 8G -f 2 -g 8`, out-of-place bus bandwidth; the time is "
            "`2 (n - 1) / n x size / busbw`. The catalog's MI300X link constants were set before this table "
            "was found and are not fitted to it.", "",
            "| size | published busbw GB/s | measured us | predicted us | error |", "|---|---|---|---|---|"]
    for size, busbw in MI300X_RCCL_ALL_REDUCE:
        t = 2 * 7 / 8 * size / (busbw * 1e9)
        pred = collective_time("all_reduce", size, 8, mi)
        out.append(f"| {size / (1 << 20):g} MiB | {busbw:g} | {t * 1e6:.1f} | {pred * 1e6:.1f} | {err(pred, t)} |")
    return out


# (bytes, bus bandwidth GB/s) of 8 MI300X, all_reduce_perf: AMD's acceptance guide (see comm_tables).
MI300X_RCCL_ALL_REDUCE = [(1 << 20, 31.38), (1 << 21, 61.31), (1 << 22, 80.89), (1 << 23, 132.49),
                          (1 << 24, 173.02), (1 << 25, 227.99), (1 << 26, 274.33), (1 << 27, 292.96),
                          (1 << 28, 303.76), (1 << 29, 309.25), (1 << 30, 312.97), (1 << 33, 316.55)]


# --- the rows: benchmarks/planner_validation/{inference,training}.csv ------------------------------

DATA = Path(__file__).resolve().parent / "planner_validation"
HELD_OUT_MODULUS = 3  # a row is held out when crc32(row id) % 3 == 0: fixed before any tuning
# Sources added after the constants were fitted are held out whole (decided before their rows
# were first predicted), so that the fit never saw them.
HELD_OUT_SOURCES = ("Oracle OCI blog (MI300X)", "NeMo Framework inference performance (Llama 2)")
# A source whose own rows contradict each other; the summary shows the sets with and without it.
QUESTIONED = {"NeMo Framework inference performance (Llama 2)":
              "its Llama-2-13B is faster than its Llama-2-7B at the same GPUs, TP and batch in 25 of 27 pairs "
              "(NVIDIA/NeMo discussion 8455 asks how)"}

TIME_METRICS = ("prefill ms", "first token ms", "TTFT ms", "decode ms/token", "ITL ms", "ms/token (whole request)",
                "request ms")
RATE_METRICS = ("tokens/s", "tokens/s/GPU", "MFU", "hardware TFLOP/s per GPU")


def row_id(r: dict) -> str:
    keys = ("source", "model", "device", "dtype", "tp", "pp", "dp", "batch", "global_batch", "prompt", "output",
            "recompute", "metric")
    return "|".join(str(r[k]) for k in keys if k in r)


def held_out(r: dict) -> bool:
    return r["source"] in HELD_OUT_SOURCES or zlib.crc32(row_id(r).encode()) % HELD_OUT_MODULUS == 0


def load_rows(name: str) -> list[dict]:
    with open(DATA / name) as f:
        return list(csv.DictReader(f))


def model_of(name: str):
    return CUSTOM_MODELS[name] if name in CUSTOM_MODELS else resolve_model(name)


def impossible(r: dict) -> bool:
    """A measurement faster than physics allows: every decode step reads each rank's share of the
    weights a token multiplies by (the active parameters: ``k`` experts of a mixture) at least
    once, at no more than the datasheet memory bandwidth. Such a row is shown
    but kept out of the statistics (it was mislabelled or measured something else)."""
    if r.get("kind", "inference") != "inference" or "tp" not in r:
        return False
    arch = model_of(r["model"])
    dev = BUILTIN_DEVICES[r["device"]]
    tp, batch, output = int(r["tp"]), int(r["batch"]), int(r["output"])
    step = arch.active_params_per_token() * DTYPE_BYTES[r["dtype"]] / tp / (dev.memory_bandwidth_GBps * 1e9)
    meas, metric = float(r["measured"]), r["metric"]
    if metric == "request ms":
        return meas * 1e-3 < (output - 1) * step
    if metric in ("decode ms/token", "ITL ms"):
        return meas * 1e-3 < step
    if metric in ("tokens/s", "tokens/s/GPU"):
        return meas * (tp if metric == "tokens/s/GPU" else 1) > batch / step
    return False


@dataclass
class Result:
    """One row and its prediction; ``error`` is on time (predicted time / measured time - 1, so a
    negative error is an optimistic prediction whatever the metric). Rows ``impossible`` calls
    physically impossible are shown but not counted."""

    row: dict
    kind: str
    predicted: float
    measured: float

    @property
    def counted(self) -> bool:
        return not impossible({**self.row, "kind": self.kind})

    @property
    def error(self) -> float:
        metric = self.row["metric"]
        if metric in RATE_METRICS:
            return self.measured / self.predicted - 1
        return self.predicted / self.measured - 1

    @property
    def held_out(self) -> bool:
        return held_out(self.row)


# --- inference -------------------------------------------------------------------------------------


def predict_inference(r: dict, engines: dict | None = None, devices: dict | None = None) -> float:
    """The row's metric as predicted under its engine's profile (``engines``/``devices`` replace
    the built-in profiles and devices while fitting)."""
    arch = model_of(r["model"])
    dev = (devices or BUILTIN_DEVICES)[r["device"]]
    engine = (engines or ENGINES)[r["engine"]]
    dtype, tp, batch = r["dtype"], int(r["tp"]), int(r["batch"])
    prompt, output = int(r["prompt"]), int(r["output"])
    kv = "fp8" if dtype == "fp8" else "bf16"
    p = Precision(dtype, kv)
    t = inference_times(arch, busiest_shard(arch, tp), p, dev, Placement(tp, 1, 1, 1, dev.gpus_per_node),
                        batch, prompt, output, engine=engine)
    request = t.ttft + (output - 1) * t.tpot
    metric = r["metric"]
    if metric in ("prefill ms", "first token ms", "TTFT ms"):
        return t.ttft * 1e3
    if metric in ("decode ms/token", "ITL ms"):
        return t.tpot * 1e3
    if metric == "ms/token (whole request)":
        return request * 1e3 / output
    if metric == "request ms":
        return request * 1e3
    if metric == "tokens/s":
        return batch * output / request
    if metric == "tokens/s/GPU":
        return batch * output / request / tp
    raise ValueError(f"unknown metric {metric!r}")


# Engine constants fitted on the fitting set, by engine: only those its rows can tell apart
# (vLLM has no int8 rows and too few to fit a memory efficiency; TensorRT-LLM's 8-bit rows are
# FP8 with native kernels; only vLLM's driver broadcasts inputs to its workers).
FIT_PARAMS = {
    "gpt-fast": ("step_overhead_us", "layer_overhead_us", "allreduce_latency_us", "memory_efficiency",
                 "int8_weight_efficiency"),
    "trtllm": ("step_overhead_us", "layer_overhead_us", "allreduce_latency_us", "memory_efficiency"),
    "trtllm-0.6": ("gqa_kv_read_fraction", "gqa_kv_read_fraction_8bit", "prefill_overhead_us",
                   "attention_memory_efficiency", "bandwidth_per_sm_GBps"),
    "vllm": ("step_overhead_us", "layer_overhead_us", "allreduce_latency_us", "step_overhead_per_rank_us"),
    "lmdeploy": ("step_overhead_us", "layer_overhead_us", "allreduce_latency_us", "memory_efficiency",
                 "prefill_overhead_us", "gemm_half_rows"),
}
START = {"step_overhead_us": 200.0, "layer_overhead_us": 20.0, "allreduce_latency_us": 20.0,
         "memory_efficiency": 0.8, "int8_weight_efficiency": 0.9, "step_overhead_per_rank_us": 100.0,
         "gqa_kv_read_fraction": 0.5, "gqa_kv_read_fraction_8bit": 0.5, "bandwidth_per_sm_GBps": 25.0,
         "prefill_overhead_us": 500.0, "attention_memory_efficiency": 0.8}
# The catalog's constants fitted with them (every GPU of the catalog that does not state its own
# measured value shares them).
CATALOG_PARAMS = ("low_precision_efficiency",)
BOUNDS = {"step_overhead_us": (10.0, 5000.0), "layer_overhead_us": (1.0, 500.0), "allreduce_latency_us": (5.0, 100.0),
          "memory_efficiency": (0.3, 0.92), "int8_weight_efficiency": (0.3, 1.0),
          "step_overhead_per_rank_us": (0.0, 2000.0), "gqa_kv_read_fraction": (0.01, 1.0),
          "gqa_kv_read_fraction_8bit": (0.01, 1.0), "bandwidth_per_sm_GBps": (10.0, 100.0),
          "low_precision_efficiency": (0.3, 1.0), "prefill_overhead_us": (0.0, 20000.0),
          "attention_memory_efficiency": (0.2, 0.92), "gemm_half_rows": (1.0, 4096.0)}
# Physical ranges: a one-shot all-reduce takes at least 5 us; no kernel streams memory at more than
# about 0.9 of the datasheet bandwidth (an H100 device-to-device copy: 3.0 of 3.35 TB/s).


def shares_catalog(d) -> bool:
    """A GPU whose 8-bit rate is the catalog's fitted one (the MI300X states its measured rate)."""
    return not d.is_cpu and d.low_precision_efficiency == LOW_PRECISION_EFFICIENCY


def fit(iterations: int = 2000, only: tuple | None = None) -> dict:
    """The constants ``engines`` and ``hardware`` call fitted (``FIT_PARAMS`` and the catalog's
    ``CATALOG_PARAMS``; with ``only``, those engines' and the catalog's, the others kept as they
    are), minimizing the absolute log error over the fitting set's
    inference rows only (Nelder-Mead in log space)."""
    rows = [r for r in load_rows("inference.csv") if not held_out(r) and not impossible(r)]
    keys = [(e, f) for e, fields in FIT_PARAMS.items() if only is None or e in only for f in fields]
    keys += [(None, f) for f in CATALOG_PARAMS]

    def value(f, v):
        lo, hi = BOUNDS[f]
        return min(hi, max(lo, math.exp(v)))

    def unpack(x):
        engines, catalog, old = dict(ENGINES), {}, {}
        old = {f: getattr(ENGINES["trtllm-0.6"], f) for f in FIT_PARAMS["trtllm-0.6"]}
        for (e, f), v in zip(keys, x):
            if e is None:
                catalog[f] = value(f, v)
            elif e != "trtllm-0.6":
                engines[e] = replace(engines[e], **{f: value(f, v)})
            else:
                old[f] = value(f, v)
        engines["trtllm-0.6"] = replace(engines["trtllm"], name="trtllm-0.6", **old)  # trtllm's constants, and its own
        devices = {k: replace(d, **catalog) if shares_catalog(d) else d for k, d in BUILTIN_DEVICES.items()}
        return engines, devices, catalog

    def loss(x):
        engines, devices, _ = unpack(x)
        total = 0.0
        for r in rows:
            res = Result(r, "inference", predict_inference(r, engines, devices), float(r["measured"]))
            total += abs(math.log(1 + res.error))
        return total

    def start(e, f):  # the current constants where set (a warm start), else START
        cur = getattr(BUILTIN_DEVICES["h100-sxm"], f) if e is None else getattr(ENGINES[e], f, None)
        return cur if cur not in (None, 0.0, 1.0) or f not in START else START[f]

    x0 = [math.log(start(e, f)) for e, f in keys]
    best = nelder_mead(loss, x0, iterations=iterations)
    best = nelder_mead(loss, best, step=0.2, iterations=iterations)  # a restart, as simplexes collapse
    return {f"{e or 'catalog'}.{f}": round(value(f, v), 3) for (e, f), v in zip(keys, best)}


# --- training --------------------------------------------------------------------------------------


def predict_training(r: dict) -> tuple[float, float]:
    """(predicted, measured) in the row's metric (MFU or hardware TFLOP/s per GPU)."""
    arch = model_of(r["model"])
    dev = BUILTIN_DEVICES[r["device"]]
    tp, pp, dp, gbs, s = (int(r[k]) for k in ("tp", "pp", "dp", "global_batch", "seq"))
    gpus = tp * pp * dp
    peak = dev.peak_flops("bf16")
    t = training_time(arch, busiest_shard(arch, tp), Precision("bf16", "bf16"), dev, Placement(tp, pp, dp, 1, 8),
                      s, 1, gbs, r["recompute"], False)
    if r["metric"] == "MFU":
        return model_flops(arch, s, gbs * s) / (t.step * gpus * peak), float(r["measured"])
    # the paper's TFLOP/s count the recomputed forward: 96 B s l h^2 (1 + s / 6h + V / 16 l h)
    B, l, h, V = gbs, arch.layers, arch.hidden, arch.vocab
    hw = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    return hw / (t.step * gpus) / 1e12, float(r["measured"])


# --- statistics and tables -------------------------------------------------------------------------


def results() -> list[Result]:
    out = []
    for r in load_rows("inference.csv"):
        out.append(Result(r, "inference", predict_inference(r), float(r["measured"])))
    for r in load_rows("training.csv"):
        pred, meas = predict_training(r)
        out.append(Result(r, "training", pred, meas))
    return out


def stats(errors: list[float]) -> dict:
    """median, p90 (nearest rank) and worst absolute error, and the signed median (bias)."""
    a = sorted(abs(e) for e in errors)
    s = sorted(errors)
    n = len(a)

    def median(v):
        return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2

    return {"n": n, "median": median(a), "p90": a[max(0, math.ceil(0.9 * n) - 1)], "worst": a[-1],
            "bias": median(s)}


def pct(x: float, signed: bool = False) -> str:
    return f"{100 * x:+.0f}%" if signed else f"{100 * x:.0f}%"


def stats_row(label: str, errors: list[float]) -> str:
    s = stats(errors)
    return (f"| {label} | {s['n']} | {pct(s['median'])} | {pct(s['p90'])} | {pct(s['worst'])} | "
            f"{pct(s['bias'], True)} |")


STATS_HEADER = ["| rows | n | median abs error | p90 | worst | signed median (bias) |", "|---|---|---|---|---|---|"]


def summary_tables(res: list[Result]) -> list[str]:
    excluded = [r for r in res if not r.counted]
    res = [r for r in res if r.counted]
    fit = [r for r in res if not r.held_out]
    held = [r for r in res if r.held_out]
    out = [f"{len(excluded)} rows are physically impossible (faster than streaming the weights once per token "
           f"at the datasheet bandwidth) and are left out of every statistic; the row tables mark them.", "",
           *[f"Questioned source: {k}: {v}." for k, v in QUESTIONED.items()], "",
           "### By set", "", *STATS_HEADER]
    for label, rs in (("fitting set", fit), ("held-out set", held), ("all rows", res)):
        out.append(stats_row(label, [r.error for r in rs]))
    for source in QUESTIONED:
        for label, rs in (("held-out set", held), ("all rows", res)):
            out.append(stats_row(f"{label} without {source}", [r.error for r in rs if r.row["source"] != source]))
    for kind in ("inference", "training"):
        for label, rs in (("fitting", fit), ("held-out", held)):
            out.append(stats_row(f"{label}, {kind}", [r.error for r in rs if r.kind == kind]))
    for title, key in (("By source", lambda r: r.row["source"]), ("By metric", lambda r: r.row["metric"])):
        out += ["", f"### {title}", "",
                "| " + title.split()[1] + " | set | n | median abs error | p90 | worst | signed median (bias) |",
                "|---|---|---|---|---|---|---|"]
        for k in sorted({key(r) for r in res}):
            for label, rs in (("fitting", fit), ("held-out", held)):
                group = [r.error for r in rs if key(r) == k]
                if group:
                    out.append(f"| {k} " + stats_row(label, group))
    return out


def inference_table(res: list[Result]) -> list[str]:
    out = ["| set | source | model | hardware | dtype | TP | batch | prompt / output | engine | metric | measured "
           "| predicted | error (time) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in res:
        if x.kind != "inference":
            continue
        r = x.row
        name = r["model"] + (f" ({r['note']})" if r["note"] else "")
        where = ("held-out" if x.held_out else "fit") if x.counted else "impossible: not counted"
        out.append(f"| {where} | {r['source']} | {name} | {r['device']} | {r['dtype']} | "
                   f"{r['tp']} | {r['batch']} | {r['prompt']} / {r['output']} | {r['engine']} | {r['metric']} | "
                   f"{x.measured:,.1f} | {x.predicted:,.1f} | {pct(x.error, True)} |")
    return out


def training_table(res: list[Result]) -> list[str]:
    out = ["| set | source | model | GPUs | TP / PP / DP | global batch x seq | recompute | metric | measured "
           "| predicted | error (time) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in res:
        if x.kind != "training":
            continue
        r = x.row
        gpus = int(r["tp"]) * int(r["pp"]) * int(r["dp"])
        fmt = "{:.1%}" if r["metric"] == "MFU" else "{:.0f}"
        out.append(f"| {'held-out' if x.held_out else 'fit'} | {r['source']} | {r['model']} | {gpus} | "
                   f"{r['tp']} / {r['pp']} / {r['dp']} | {r['global_batch']} x {r['seq']} | {r['recompute']} | "
                   f"{r['metric']} | {fmt.format(x.measured)} | {fmt.format(x.predicted)} | {pct(x.error, True)} |")
    return out


def plateau_table() -> list[str]:
    out = ["| model | hardware | engine | source | TP=4 ms/token | TP=8 ms/token | TP=8 speedup measured "
           "| predicted speedup |", "|---|---|---|---|---|---|---|---|"]
    rows = [("llama-2-70b", "a100-80gb-sxm", "gpt-fast", "gpt-fast README (batch 1)", 1e3 / 38.01, 1e3 / 62.50, 5, 200),
            ("qwq-32b", "a100-80gb-sxm", "vllm", "vLLM issue 16300 (batch 1)", 3910 / 200, 3150 / 200, 1, 200),
            ("llama-2-70b", "h100-sxm", "vllm", "no published pair found; prediction only", None, None, 512, 128)]
    for model, dev, engine, src, m4, m8, prompt, output in rows:
        base = dict(model=model, device=dev, dtype="bf16", batch=1, prompt=prompt, output=output,
                    metric="decode ms/token", engine=engine)
        t4 = predict_inference({**base, "tp": 4})
        t8 = predict_inference({**base, "tp": 8})
        meas = f"{m4 / m8:.2f}x" if m4 else "-"
        out.append(f"| {model} | {dev} | {engine} | {src} | {m4 or t4:.1f}{'' if m4 else ' (pred.)'} | "
                   f"{m8 or t8:.1f}{'' if m8 else ' (pred.)'} | {meas} | {t4 / t8:.2f}x |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration-dir", default=str(ROOT.parent / "shared" / "calibration"))
    ap.add_argument("--fit", action="store_true", help="fit the engine constants on the fitting set and print them")
    ap.add_argument("--engines", help="with --fit: refit only these engines' constants (comma-separated), and the "
                    "catalog's; the others stay as they are")
    ap.add_argument("--write", action="store_true",
                    help="replace the generated part of docs/planner-validation.md instead of printing it")
    args = ap.parse_args()
    if args.fit:
        for k, v in fit(only=tuple(args.engines.split(",")) if args.engines else None).items():
            print(k, v)
        return
    res = results()
    sections = [("Summary", summary_tables(res)), ("Communication", comm_tables(Path(args.calibration_dir))),
                ("Inference", inference_table(res)), ("Decode plateau", plateau_table()),
                ("Training", training_table(res))]
    text = "".join(f"## {title}\n\n" + "\n".join(lines) + "\n\n" for title, lines in sections)
    if not args.write:
        print(text, end="")
        return
    doc = ROOT / "docs" / "planner-validation.md"
    old = doc.read_text()
    a, b = old.index(BEGIN) + len(BEGIN), old.index(END)
    doc.write_text(old[:a] + "\n\n" + text + old[b:])


BEGIN = "<!-- generated by benchmarks/planner_validation.py --write: begin -->"
END = "<!-- generated by benchmarks/planner_validation.py --write: end -->"


if __name__ == "__main__":
    main()
