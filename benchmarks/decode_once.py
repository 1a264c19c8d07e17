"""One degree's decode and prefill figures, as ``tensorpar bench`` measures them, on one line.

    PYTHONPATH=SRC python benchmarks/decode_once.py LABEL TP

Prints ``LABEL TP {batch: decode ms/token} prefill-tokens/s`` for SmolLM2-135M (batches 1 and 8,
32 new tokens, a 512-token prefill, best of 2). Run it alternately with two source trees on
``PYTHONPATH`` to compare revisions pair by pair on a noisy machine (BENCHMARKS.md).
"""

import sys

if __name__ == "__main__":
    from tensorpar.bench.measure import measure_tensorpar

    tp = int(sys.argv[2])
    r = measure_tensorpar("smollm2-135m", tp, [1, 8], 32, 512, 2)
    print(sys.argv[1], tp, {k: round(v, 2) for k, v in r["decode_ms_per_token"].items()},
          round(r["prefill_tokens_per_s"]), flush=True)
