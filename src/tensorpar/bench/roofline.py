"""The weight-streaming floor of batch-1 decode: weight bytes over memory bandwidth.

A batch-1 decode step reads every weight once, so no implementation can beat
``weight_bytes / read_bandwidth``. Weight bytes are the model's parameters at float32 as its
config implies (``checkpoint_shapes``; a tied embedding / LM head counts once, since the LM head
streams all of it). Bandwidth is measured here, in a fresh process with one thread:

- read: ``a.sum()`` over a 256 MB float32 tensor, bytes = 256 MB;
- copy: ``b.copy_(a)``, bytes = 512 MB (read + write);

best of several. The roofline is reported at one core, and for TP > 1 as
``roofline / min(tp, cores)`` (perfect scaling over the cores the ranks get).

    python -m tensorpar.bench.roofline [--mb 256] [--repeats 7] [--threads 1]   # prints JSON
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from tensorpar.models.config import ModelConfig


def weight_bytes(config: ModelConfig, bytes_per_param: int = 4) -> int:
    """Bytes of the checkpoint tensors one decoded token (batch 1) reads, each counted once: all of
    them, except that an MoE layer reads only its ``experts_per_token`` chosen experts."""
    import re

    from tensorpar.models.registry import checkpoint_shapes

    expert = re.compile(r"\.mlp\.experts\.(\d+)\.")
    total = 0
    for name, shape in checkpoint_shapes(config).items():
        m = expert.search(name)
        if m is None or int(m.group(1)) < config.experts_per_token:  # (any k experts: they are alike in size)
            total += math.prod(shape)
    return total * bytes_per_param


def measure_bandwidth(mb: int = 256, repeats: int = 7, threads: int = 1) -> dict:
    """Read and copy bandwidth (GB/s, 1e9 bytes) with ``threads`` torch threads, best of ``repeats``."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = mb * (1 << 20) // 4
        a = torch.rand(n)
        b = torch.empty_like(a)
        b.copy_(a)  # first touch
        nbytes = a.numel() * 4

        def best(fn) -> float:
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return min(times)

        read_s = best(lambda: float(a.sum()))
        copy_s = best(lambda: b.copy_(a))
        return {
            "threads": threads,
            "tensor_mb": mb,
            "repeats": repeats,
            "read_GBps": nbytes / read_s / 1e9,
            "copy_GBps": 2 * nbytes / copy_s / 1e9,
        }
    finally:
        torch.set_num_threads(before)


def measure_in_subprocess(mb: int = 256, repeats: int = 7, threads: int = 1, timeout_s: float = 120) -> dict:
    """``measure_bandwidth`` in a fresh process (its buffers and threads stay out of ours)."""
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "tensorpar.bench.roofline", "--mb", str(mb), "--repeats", str(repeats),
         "--threads", str(threads)],
        capture_output=True, text=True, timeout=timeout_s,
    )
    if r.returncode != 0:
        raise RuntimeError(f"bandwidth test failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def roofline(weight_nbytes: int, read_GBps: float, cores: int, decode_b1_ms: dict[int, float | None]) -> dict:
    """Roofline ms/token at one core, and each TP degree's measured batch-1 decode as a percentage
    of its roofline (``roofline_ms / measured_ms * 100``; TP > 1 gets ``min(tp, cores)`` cores)."""
    one_core_ms = weight_nbytes / (read_GBps * 1e9) * 1e3
    per_tp = []
    for tp, measured in sorted(decode_b1_ms.items()):
        floor = one_core_ms / min(tp, cores)
        per_tp.append({
            "tp": tp,
            "cores_used": min(tp, cores),
            "roofline_ms": floor,
            "measured_ms": measured,
            "percent_of_roofline": (floor / measured * 100) if measured else None,
        })
    return {"roofline_ms_1core": one_core_ms, "per_tp": per_tp}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="memory bandwidth: read (a.sum()) and copy (b.copy_(a))")
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    print(json.dumps(measure_bandwidth(args.mb, args.repeats, args.threads)))


if __name__ == "__main__":
    main()
