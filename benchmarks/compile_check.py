"""``torch.compile`` against eager on the decode path: the logits, teacher-forced, and the step time.

    python benchmarks/compile_check.py [--model smollm2-135m] [--steps 24] [--dynamic true|false|none]
                                       [--freezing] [--cpp-wrapper]

One rank (TP=1), float32. A 16-token prompt is prefilled eagerly, then the same ``--steps`` decode
tokens are fed to the eager model and to ``torch.compile(model)``, each with a KV cache of its
own, so that both see exactly the same inputs at every step (comparing the logits of two free
runs would compare different continuations as soon as a near-tie flips a token). Prints the
largest absolute and relative logit difference per step, whether the argmax agrees, and the
median decode step time of each (compilation excluded: the first compiled steps are dropped).

Eager is the shipped path (the fused C++ decode stack, ``layers.decode_stack``, where it is built);
the compiled model runs the plain torch modules (``TENSORPAR_FUSED`` off inside it: Inductor
cannot see into our C++ operators), with Inductor's ``freezing`` (weights folded in as constants)
and ``cpp_wrapper`` (the graph called from C++, not Python) where asked: the "Inductor route" of
issue 30, at a fixed batch of one row.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tensorpar.distributed.groups import single_process_context
from tensorpar.layers import fused
from tensorpar.loading import build_model, open_source
from tensorpar.runtime import messages
from tensorpar.runtime.kv_cache import KVCache


BLOCK = 16
cache_blocks = 1024 // BLOCK + 1  # one sequence of up to 1024 positions, and the padding block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--dynamic", default="true", choices=["true", "false", "none"])
    ap.add_argument("--freezing", action="store_true")
    ap.add_argument("--cpp-wrapper", action="store_true")
    args = ap.parse_args()
    import torch._inductor.config as inductor

    inductor.freezing, inductor.cpp_wrapper = args.freezing, args.cpp_wrapper
    model = build_model(open_source(args.model), single_process_context())
    compiled_model = torch.compile(model, dynamic={"true": True, "false": False, "none": None}[args.dynamic])

    def compiled(*a):
        with fused.enabled(False):
            return compiled_model(*a)

    def runner(m):
        cache = KVCache(model.kv_cache_shape(), cache_blocks, BLOCK, torch.float32, torch.device("cpu"))

        def run(message):
            batch = messages.to_batch(message.header(), torch.tensor(message.payload()))
            with torch.no_grad():
                t = time.perf_counter()
                logits = model.lm_head(batch.last_tokens(m(batch.ids, batch.attention, cache)))
                return logits[0], time.perf_counter() - t

        return run

    eager, comp = runner(model), runner(compiled)
    prompt = list(range(300, 316))
    blocks = list(range(1, cache_blocks))  # one sequence's block table
    first, _ = eager(messages.step([messages.chunk(prompt, 0, len(prompt), blocks, BLOCK)]))
    comp(messages.step([messages.chunk(prompt, 0, len(prompt), blocks, BLOCK)]))
    tokens = [int(first.argmax())]
    times = {"eager": [], "compiled": []}
    worst_abs = worst_rel = 0.0
    flips = 0
    for i in range(args.steps):
        message = messages.step([messages.decode_part([tokens[-1]], [len(prompt) + i], [blocks], BLOCK)])
        a, ta = eager(message)
        b, tb = comp(message)
        times["eager"].append(ta)
        if i >= 3:
            times["compiled"].append(tb)
        diff = (a - b).abs().max().item()
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / a.abs().max().item())
        flips += int(a.argmax() != b.argmax())
        print(f"step {i:2d}: max |eager - compiled| = {diff:.2e}, argmax {'equal' if a.argmax() == b.argmax() else 'DIFFERS'}")
        tokens.append(int(a.argmax()))  # both are fed the eager model's token: teacher forcing
    print(f"largest logit difference {worst_abs:.2e} ({worst_rel:.1e} of the largest logit); argmax flips: {flips}")
    print(f"decode step: eager {statistics.median(times['eager']) * 1e3:.1f} ms, "
          f"compiled {statistics.median(times['compiled']) * 1e3:.1f} ms (median, dynamic={args.dynamic}, "
          f"freezing={args.freezing}, cpp_wrapper={args.cpp_wrapper})")


if __name__ == "__main__":
    main()
