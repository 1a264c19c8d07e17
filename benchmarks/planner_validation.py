"""Predictions of ``tensorpar plan``'s model against published measurements (docs/planner-validation.md).

    .venv/bin/python benchmarks/planner_validation.py [--calibration-dir ../shared/calibration]

Prints the markdown tables of docs/planner-validation.md. Nothing here is fitted to the rows it
checks: the devices are the built-in catalog (datasheets, the one communication fit below, and
efficiency factors fixed beforehand); only the communication constants are fitted, once, on the
DGX-H100 NCCL file, and then checked on the DGX-A100 file and on published nccl-tests figures.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import replace
from pathlib import Path

from tensorpar.planner.arch import from_hf_config, resolve_model
from tensorpar.planner.comm import collective_time
from tensorpar.planner.costs import Precision, busiest_shard
from tensorpar.planner.hardware import (
    BUILTIN_DEVICES,
    NVLINK_LATENCY_PER_RANK_US,
    NVLINK_LATENCY_US,
    RING_EFFICIENCY,
    Link,
)
from tensorpar.planner.latency import Placement, inference_times
from tensorpar.planner.training import model_flops, training_time

ROOT = Path(__file__).resolve().parents[1]

QWQ_32B = from_hf_config(dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                              num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                              max_position_embeddings=40960, use_sliding_window=False), name="QwQ-32B")
FT_13B = from_hf_config(dict(model_type="gpt2", vocab_size=50272, n_embd=5120, n_layer=40, n_head=40,
                             n_positions=2048), name="13B (GPT, kipply)")
GPT3_175B = from_hf_config(dict(model_type="gpt2", vocab_size=51200, n_embd=12288, n_layer=96, n_head=96,
                                n_positions=2048), name="GPT-3 175B")
MT_530B = from_hf_config(dict(model_type="gpt2", vocab_size=51200, n_embd=20480, n_layer=105, n_head=128,
                              n_positions=2048), name="GPT 530B")


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


def fit_h100(rows) -> tuple[float, float, float]:
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
    a0, a1, busbw = fit_h100(h100)
    out = ["### The fit (DGX-H100 file, every message >= 1 MiB, 2, 4 and 8 GPUs together)", "",
           f"alpha(n) = {a0 * 1e6:.1f} us + {a1 * 1e6:.2f} us x (n - 1); bus bandwidth {busbw / 1e9:.0f} GB/s "
           f"= {busbw / 450e9:.3f} x the 450 GB/s NVLink. The catalog uses {NVLINK_LATENCY_US} us, "
           f"{NVLINK_LATENCY_PER_RANK_US} us and {RING_EFFICIENCY}.", ""]

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
    out += table(a100, a100_cluster, "A100 (not fitted)")
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
    return out


# --- inference -------------------------------------------------------------------------------------


def predict(arch, device: str, tp: int, batch: int, prompt: int, output: int, dtype: str = "bf16", kv=None):
    dev = BUILTIN_DEVICES[device]
    p = Precision(dtype, kv or ("fp8" if dtype == "fp8" else dtype if dtype != "int8" else "bf16"))
    return inference_times(arch, busiest_shard(arch, tp), p, dev, Placement(tp, 1, 1, 1, dev.gpus_per_node),
                           batch, prompt, output)


INFERENCE = [
    # (source, model, device, dtype, tp, batch, prompt, output, metric, measured, note)
    ("FasterTransformer via kipply / llm-analysis", FT_13B, "a100-40gb-sxm", "fp16", 1, 1, 512, 10, "prefill ms", 63.17, ""),
    ("FasterTransformer via kipply / llm-analysis", FT_13B, "a100-40gb-sxm", "fp16", 1, 1, 512, 10, "decode ms/token", 22.0, ""),
    ("FasterTransformer via kipply / llm-analysis", FT_13B, "a100-40gb-sxm", "fp16", 2, 1, 512, 10, "prefill ms", 45.45, ""),
    ("FasterTransformer via kipply / llm-analysis", FT_13B, "a100-40gb-sxm", "fp16", 2, 1, 512, 10, "decode ms/token", 13.5, ""),
    ("gpt-fast README", "llama-2-7b", "a100-80gb-sxm", "bf16", 1, 1, 5, 200, "decode ms/token", 1e3 / 104.9, "330 W"),
    ("gpt-fast README", "llama-2-7b", "a100-80gb-sxm", "bf16", 2, 1, 5, 200, "decode ms/token", 1e3 / 168.84, "330 W"),
    ("gpt-fast README", "llama-2-7b", "a100-80gb-sxm", "bf16", 4, 1, 5, 200, "decode ms/token", 1e3 / 254.02, "330 W"),
    ("gpt-fast README", "llama-2-7b", "a100-80gb-sxm", "bf16", 8, 1, 5, 200, "decode ms/token", 1e3 / 328.43, "330 W"),
    ("gpt-fast README", "llama-2-70b", "a100-80gb-sxm", "bf16", 2, 1, 5, 200, "decode ms/token", 1e3 / 21.32, "330 W"),
    ("gpt-fast README", "llama-2-70b", "a100-80gb-sxm", "bf16", 4, 1, 5, 200, "decode ms/token", 1e3 / 38.01, "330 W"),
    ("gpt-fast README", "llama-2-70b", "a100-80gb-sxm", "bf16", 8, 1, 5, 200, "decode ms/token", 1e3 / 62.50, "330 W"),
    ("vLLM issue 16300", QWQ_32B, "a100-80gb-sxm", "bf16", 2, 1, 1, 200, "ms/token (whole request)", 5500 / 200, ""),
    ("vLLM issue 16300", QWQ_32B, "a100-80gb-sxm", "bf16", 4, 1, 1, 200, "ms/token (whole request)", 3910 / 200, ""),
    ("vLLM issue 16300", QWQ_32B, "a100-80gb-sxm", "bf16", 8, 1, 1, 200, "ms/token (whole request)", 3150 / 200, ""),
    ("TensorRT-LLM v0.5 performance.md", "llama-2-7b", "h100-sxm", "fp8", 1, 1, 128, 1, "first token ms", 7, ""),
    ("TensorRT-LLM v0.5 performance.md", "llama-2-7b", "h100-sxm", "fp8", 1, 1, 2048, 1, "first token ms", 36, ""),
    ("TensorRT-LLM v0.5 performance.md", "llama-2-70b", "h100-sxm", "fp8", 4, 1, 128, 1, "first token ms", 26, ""),
    ("TensorRT-LLM v0.5 performance.md", "llama-2-70b", "h100-sxm", "fp8", 4, 1, 2048, 1, "first token ms", 109, ""),
    ("TensorRT-LLM v0.5 performance.md", "llama-2-7b", "a100-80gb-sxm", "fp16", 1, 1, 128, 1, "first token ms", 16, "A100 size not stated"),
    ("TensorRT-LLM v0.5 performance.md", "llama-2-7b", "a100-80gb-sxm", "fp16", 1, 1, 2048, 1, "first token ms", 133, "A100 size not stated"),
    ("TensorRT-LLM v0.5 performance.md", "llama-2-70b", "a100-80gb-sxm", "fp16", 4, 1, 128, 1, "first token ms", 47, "A100 size not stated"),
    ("TensorRT-LLM v0.5 performance.md", "llama-2-70b", "a100-80gb-sxm", "fp16", 4, 1, 2048, 1, "first token ms", 377, "A100 size not stated"),
    ("NVIDIA NIM benchmarking (1.8.0)", "llama-3-70b", "h100-sxm", "fp8", 2, 1, 500, 2000, "TTFT ms", 47.77, "Llama-3.3-70B"),
    ("NVIDIA NIM benchmarking (1.8.0)", "llama-3-70b", "h100-sxm", "fp8", 2, 1, 500, 2000, "ITL ms", 18.91, "Llama-3.3-70B"),
    ("NVIDIA NIM benchmarking (1.8.0)", "llama-3-70b", "h100-sxm", "fp8", 2, 1, 5000, 500, "TTFT ms", 406.77, "Llama-3.3-70B"),
    ("NVIDIA NIM benchmarking (1.8.0)", "llama-3-70b", "h100-sxm", "fp8", 2, 1, 5000, 500, "ITL ms", 18.58, "Llama-3.3-70B"),
    ("vLLM CI latency test (buildkite build 9515)", "llama-3-8b", "h200-sxm", "bf16", 1, 8, 32, 128, "request ms", 833.42, "Llama-3.1-8B"),
    ("vLLM CI latency test (buildkite build 9515)", "llama-3-70b", "h200-sxm", "bf16", 4, 8, 32, 128, "request ms", 2077.53, ""),
    ("vLLM CI latency test (buildkite build 9515)", "mixtral-8x7b", "h200-sxm", "bf16", 2, 8, 32, 128, "request ms", 1917.44, "MoE"),
]


def inference_table() -> list[str]:
    out = ["| source | model | hardware | dtype | TP | batch | prompt / output | metric | measured | predicted | error |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    errors = []
    for src, model, dev, dtype, tp, b, prompt, output, metric, meas, note in INFERENCE:
        arch = resolve_model(model) if isinstance(model, str) else model
        r = predict(arch, dev, tp, b, prompt, output, dtype)
        if metric in ("prefill ms", "first token ms", "TTFT ms"):
            pred = r.ttft * 1e3
        elif metric in ("decode ms/token", "ITL ms"):
            pred = r.tpot * 1e3
        elif metric == "ms/token (whole request)":
            pred = (r.ttft + (output - 1) * r.tpot) * 1e3 / output
        else:
            pred = (r.ttft + (output - 1) * r.tpot) * 1e3
        errors.append(abs(pred / meas - 1))
        name = arch.name + (f" ({note})" if note else "")
        out.append(f"| {src} | {name} | {dev} | {dtype} | {tp} | {b} | {prompt} / {output} | {metric} | "
                   f"{meas:.1f} | {pred:.1f} | {err(pred, meas)} |")
    errors.sort()
    out += ["", f"{len(errors)} rows: median absolute error {100 * errors[len(errors) // 2]:.0f}%, "
                f"mean {100 * sum(errors) / len(errors):.0f}%, largest {100 * errors[-1]:.0f}%."]
    return out


def plateau_table() -> list[str]:
    out = ["| model | hardware | source | TP=4 ms/token | TP=8 ms/token | TP=8 speedup measured | predicted speedup "
           "| weights alone |", "|---|---|---|---|---|---|---|---|"]
    rows = [("llama-2-70b", "a100-80gb-sxm", "gpt-fast README (batch 1)", 1e3 / 38.01, 1e3 / 62.50, 5, 200),
            (QWQ_32B, "a100-80gb-sxm", "vLLM issue 16300 (batch 1)", 3910 / 200, 3150 / 200, 1, 200),
            ("llama-2-70b", "h100-sxm", "no published pair found; prediction only", None, None, 512, 128)]
    for model, dev, src, m4, m8, prompt, output in rows:
        arch = resolve_model(model) if isinstance(model, str) else model
        t4 = predict(arch, dev, 4, 1, prompt, output)
        t8 = predict(arch, dev, 8, 1, prompt, output)
        w = t4.decode.breakdown.memory / t8.decode.breakdown.memory
        meas = f"{m4 / m8:.2f}x" if m4 else "-"
        out.append(f"| {arch.name} | {dev} | {src} | {m4 or t4.tpot * 1e3:.1f}{'' if m4 else ' (pred.)'} | "
                   f"{m8 or t8.tpot * 1e3:.1f}{'' if m8 else ' (pred.)'} | {meas} | {t4.tpot / t8.tpot:.2f}x | {w:.2f}x |")
    return out


# --- training --------------------------------------------------------------------------------------


def training_table() -> list[str]:
    a100 = BUILTIN_DEVICES["a100-80gb-sxm"]
    p = Precision("bf16", "bf16")
    out = ["| source | model | GPUs | TP / PP / DP | global batch x seq | recompute | measured MFU | predicted MFU "
           "| measured step s | predicted step s | error (step) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [
        ("Megatron-LM 2021 (153 TFLOP/s)", GPT3_175B, 8, 12, 4, 1536, "full", 153.0, None),
        ("Megatron-LM 2021 (149 TFLOP/s)", GPT3_175B, 8, 12, 8, 1536, "full", 149.0, None),
        ("Megatron-LM 2021 (141 TFLOP/s)", GPT3_175B, 8, 12, 16, 1536, "full", 141.0, None),
        ("Korthikanti et al. 2022", MT_530B, 8, 35, 8, 2240, "full", None, 0.421),
        ("Korthikanti et al. 2022", MT_530B, 8, 35, 8, 2240, "selective", None, 0.542),
    ]
    for src, arch, tp, pp, dp, gbs, rec, hw_tflops, mfu in rows:
        s = 2048
        gpus = tp * pp * dp
        flops = model_flops(arch, s, gbs * s)
        if hw_tflops is not None:
            # the paper's FLOPs count recomputation: 96 B s l h^2 (1 + s / 6h + V / 16 l h)
            B, l, h, V = gbs, arch.layers, arch.hidden, arch.vocab
            hw = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
            step = hw / (gpus * hw_tflops * 1e12)
        else:
            step = flops / (gpus * 312e12 * mfu)
        mfu_meas = flops / (step * gpus * 312e12)
        t = training_time(arch, busiest_shard(arch, tp), p, a100, Placement(tp, pp, dp, 1, 8), s, 1, gbs, rec, False)
        mfu_pred = flops / (t.step * gpus * 312e12)
        out.append(f"| {src} | {arch.name} | {gpus} | {tp} / {pp} / {dp} | {gbs} x {s} | {rec} | "
                   f"{100 * mfu_meas:.1f}% | {100 * mfu_pred:.1f}% | {step:.1f} | {t.step:.1f} | {err(t.step, step)} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration-dir", default=str(ROOT.parent / "shared" / "calibration"))
    args = ap.parse_args()
    sections = [("Communication", comm_tables(Path(args.calibration_dir))), ("Inference", inference_table()),
                ("Decode plateau", plateau_table()), ("Training", training_table())]
    for title, lines in sections:
        print(f"## {title}\n")
        print("\n".join(lines))
        print()


if __name__ == "__main__":
    main()
