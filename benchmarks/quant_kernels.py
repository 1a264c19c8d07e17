"""Weight-only quantized matmul kernels on batch-1 decode shapes, against float32 ``F.linear``.

    python benchmarks/quant_kernels.py [--threads 1] [--rows 1] [--json FILE]

Each kernel cycles over copies of its weight that together exceed the caches, so that every call
streams its weight from memory, as in a decode step. Shapes: SmolLM2-135M's projections (hidden 576, 9/3 heads of 64, MLP 1536) whole (TP=1) and as one
rank's shard at TP=2. For each, the microseconds per call (median of many) and the weight bytes
streamed per microsecond of:

- ``fp32``: ``F.linear`` on the float32 weight in tensorpar's streaming layout;
- ``int8 (fp32 x)``: ``torch.ops.aten._weight_int8pack_mm`` (int8 [out, in], one float scale per
  output row) with float32 activations;
- ``int8 (bf16 x)``: the same kernel with the activations cast to bfloat16 first (cast timed);
- ``int4 g32 / g128``: ``_weight_int4pack_mm_for_cpu`` (asymmetric int4 in groups of 32 / 128 along
  the input, packed by ``_convert_weight_to_int4pack_for_cpu``), bfloat16 activations (cast timed);
- ``int4 g32 fp16``: the same with float16 activations, scales and zeros;
- ``2 planes g32``: an 8-bit code split into two int4 planes side by side along the input (twice
  the nibbles, the activations repeated), bfloat16: how a Q8_0 / Q5 / Q6 block runs on the int4 kernel;
- ``deq8 rows``: int8 dequantized 256 output rows at a time into a reused float32 buffer, then
  ``F.linear`` on each block (the fallback for a format without a kernel).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: (in, out) of one rank's matrix
    "qkv tp1": (576, 960), "o tp1": (576, 576), "gate_up tp1": (576, 3072), "down tp1": (1536, 576),
    "qkv tp2": (576, 512), "o tp2": (320, 576), "gate_up tp2": (576, 1536), "down tp2": (768, 576),
    "head tp2": (576, 24576),
}


def timed(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(20):
            fn()
        samples.append((time.perf_counter() - t) / 20)
    return statistics.median(samples) * 1e6


def streaming(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous().t() if w.shape[0] > w.shape[1] else w


class Cycle:
    """Calls ``fn`` on copy i, i+1, ... of its operands: enough copies that their bytes exceed the
    caches (``STREAM_BYTES``), so that every call streams its weights from memory as a decode step does."""

    def __init__(self, fn, copies):
        self.fn, self.copies, self.i = fn, copies, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.copies)
        return self.fn(*self.copies[self.i])


STREAM_BYTES = 256 << 20


def kernels(k: int, n: int, rows: int) -> dict:
    """name: (call, weight bytes per call)."""
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.05
    x = torch.randn(rows, k)
    copies = max(2, STREAM_BYTES // (4 * n * k))
    out = {}
    ws = [(streaming(w.clone()),) for _ in range(copies)]
    out["fp32"] = (Cycle(lambda a: F.linear(x, a), ws), 4 * n * k)
    scale = w.abs().amax(dim=1) / 127
    q8 = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    q8s = [(q8.clone(), scale.clone()) for _ in range(copies)]
    out["int8 (fp32 x)"] = (Cycle(lambda q, s: torch.ops.aten._weight_int8pack_mm(x, q, s), q8s), n * k)
    q8b = [(q, s.to(torch.bfloat16)) for q, s in q8s]
    out["int8 (bf16 x)"] = (Cycle(lambda q, s: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, s).float(),
                                  q8b), n * k)
    for g in (32, 128):
        if k % g:
            continue
        groups = w.view(n, k // g, g)
        lo, hi = groups.amin(-1), groups.amax(-1)
        step = ((hi - lo) / 15).clamp(min=1e-8)
        q4 = torch.round((groups - lo[..., None]) / step[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
        zeros = lo + 8 * step  # the kernel computes (q - 8) * scale + zero
        sz = torch.stack([step, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [k/g, n, 2]
        out[f"int4 g{g}"] = (Cycle(lambda p, z, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), p, g, z).float(), [(packed.clone(), sz.clone()) for _ in range(copies)]), n * k // 2)
        if g == 32:
            szh = sz.to(torch.float16)
            out["int4 g32 fp16"] = (Cycle(lambda p, z: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.float16), p, 32, z).float(), [(packed.clone(), szh.clone()) for _ in range(copies)]),
                n * k // 2)
            planes = torch.cat([q4, q4], dim=1)  # an 8-bit code as two nibble planes along the input
            packed2 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(planes, 1)
            sz2 = torch.cat([sz, sz], dim=0)
            out["2 planes g32"] = (Cycle(lambda p, z: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16).repeat(1, 2), p, 32, z).float(),
                [(packed2.clone(), sz2.clone()) for _ in range(copies)]), n * k)
    buf = torch.empty(256, k)
    y = torch.empty(rows, n)

    def deq(q, s):
        for a in range(0, n, 256):
            b = min(n, a + 256)
            torch.mul(q[a:b], s[a:b, None], out=buf[: b - a])
            torch.mm(x, buf[: b - a].t(), out=y[:, a:b])
        return y
    out["deq8 rows"] = (Cycle(deq, q8s), n * k)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=1, help="activation rows (the decode batch)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    names = None
    for shape, (k, n) in SHAPES.items():
        row = {"shape": shape, "in": k, "out": n}
        for name, (fn, nbytes) in kernels(k, n, args.rows).items():
            us = timed(fn, args.repeats)
            row[name] = {"us": round(us, 1), "GBps": round(nbytes / us / 1e3, 2)}
        names = names or [c for c in row if c not in ("shape", "in", "out")]
        results.append(row)
    print(f"{args.threads} thread(s), {args.rows} row(s): us per call (weight GB/s)")
    print("shape".ljust(14) + "".join(n.rjust(18) for n in names))
    for row in results:
        print(row["shape"].ljust(14) + "".join(
            (f"{row[n]['us']:.0f} ({row[n]['GBps']:.1f})" if n in row else "-").rjust(18) for n in names))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": args.rows, "torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
