"""GB/s of the fused decode products on SmolLM2's shapes, against torch's own batch-1 product.

    python benchmarks/fused_products.py [--rows 1]

For each shape [out, in] (QKV, gate/up, down, the LM head) enough distinct weights are made to
exceed the caches (about 300 MB), and each call multiplies the next one, as a decode step does:
torch's ``F.linear`` (float32), ``dense_linear`` on float32 weights in ordinary 4 KiB pages and
after ``move_to_huge_pages``, and ``codes_linear`` on int8 rows and int4 codes in groups of 32 (with
float32 activations, and with 8-bit ones where the CPU has VNNI: ``fused.q8_activations``).
GB/s counts the bytes each format stores (codes, scales and zeros included).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from tensorpar.layers import fused, quant
from tensorpar.loading.huge_pages import move_to_huge_pages

SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]


def per_call(fn, weights: list, calls: int = 100) -> float:
    """Best of 3 mean seconds per call, cycling through ``weights``."""
    for w in weights[:2]:
        fn(w)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for i in range(calls):
            fn(weights[i % len(weights)])
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1, help="rows of x (a decode step's sequences)")
    a = p.parse_args()
    if not fused.available():
        raise SystemExit("the fused kernels are not available here")
    print(f"rows={a.rows}, {torch.get_num_threads()} threads; GB/s (us per call)")
    with torch.no_grad():
        for out, k in SHAPES:
            n = max(2, 300_000_000 // (out * k * 4))
            dense = [torch.randn(out, k) for _ in range(n)]
            x = torch.randn(a.rows, k)
            huge = nn.ParameterList([nn.Parameter(w.clone(), requires_grad=False) for w in dense])
            move_to_huge_pages(huge)
            int8 = [quant.GroupCodesWeight.symmetric_rows(w) for w in dense]
            int4 = [quant.pack_codes(quant.int4_codes(w, 32), scheme="int4") for w in dense]
            rows = {
                "torch F.linear": (per_call(lambda w: F.linear(x, w), dense), out * k * 4),
                "dense_linear 4 KiB pages": (per_call(lambda w: fused.dense_linear(x, w), dense), out * k * 4),
                "dense_linear huge pages": (per_call(lambda w: fused.dense_linear(x, w), list(huge)), out * k * 4),
                "int8 rows": (per_call(lambda w: w(x), int8), int8[0].nbytes),
                "int4 g32": (per_call(lambda w: w(x), int4), int4[0].nbytes),
            }
            if torch.ops.tensorpar.vnni():
                with fused.q8_activations():
                    rows["int4 g32, 8-bit activations"] = (per_call(lambda w: w(x), int4), int4[0].nbytes)
            print(f"[{out}, {k}]: " + ", ".join(f"{name} {b / s / 1e9:.1f} ({s * 1e6:.0f})"
                                               for name, (s, b) in rows.items()))


if __name__ == "__main__":
    main()
