"""Batched greedy decode through ``LLM``: milliseconds per decode step of 8 sequences.

    python benchmarks/decode_batch.py [--tp 1] [--model smollm2-135m] [--batch 8] [--new-tokens 256]
                                      [--prompt-tokens N]

``--batch`` short prompts (or of about ``--prompt-tokens`` tokens each), ``--new-tokens`` tokens
each (ignore_eos), the best of two runs after a warm-up; prints one JSON line. To compare two versions of tensorpar in one run, point
``PYTHONPATH`` at each one's ``src`` in turn (a ``git worktree`` of the older commit).
"""

from __future__ import annotations

import argparse
import json

from tensorpar import LLM, SamplingParams

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=0)
    args = ap.parse_args()
    with LLM(args.model, tp=args.tp, progress=False) as llm:
        filler = " word" * max(args.prompt_tokens - 8, 0)
        prompts = [f"Story number {i}:{filler} once upon a time" for i in range(args.batch)]
        sp = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        llm.generate_full(prompts[:2], SamplingParams(max_new_tokens=8))
        best = min(llm.generate_full(prompts, sp).timings["decode_s_per_token"] for _ in range(2))
        print(json.dumps({"tp": args.tp, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
                          "new_tokens": args.new_tokens,
                          "decode_ms_per_step": round(best * 1e3, 2)}))
