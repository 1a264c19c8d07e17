"""Decode time with the leader's two ways of getting logits, at several TP degrees, in one run.

    python benchmarks/logits_to_leader.py [--model smollm2-135m] [--tp 2,3] [--batch 1,8] [--out DIR]

- ``greedy``: greedy rows without top log-probabilities; the vocabulary-parallel head sends rank 0
  each row's argmax, max logit and logsumexp (three floats per row and rank).
- ``full``: the same greedy requests asking for the top-1 log-probability, so that every step
  gathers the full-vocabulary logits to rank 0 (and only there) and the leader takes top-1.

Decode ms/token is ``GenerationResult.timings["decode_s_per_token"]`` for B prompts of 16 token
ids and 32 new tokens (``ignore_eos``), the best of ``--repeats`` calls after a warm-up call, as in
``tensorpar bench``. Prints a table and writes ``logits_to_leader.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tensorpar import LLM, SamplingParams
from tensorpar.bench.prompts import batch_prompts
from tensorpar.bench.run import machine_info


def measure(model: str, tp: int, batches: list[int], new_tokens: int, repeats: int) -> dict:
    out = {}
    with LLM(model, tp=tp, progress=False) as llm:
        for b in batches:
            prompts = batch_prompts(llm.config.vocab_size, b)
            for mode, logprobs in (("greedy", 0), ("full", 1)):
                sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=logprobs)
                llm.generate_full(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=logprobs))
                ms = min(llm.generate_full(prompts, sp).timings["decode_s_per_token"] for _ in range(repeats)) * 1e3
                out[f"{mode}_b{b}"] = round(ms, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", default="2,3")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    rows = {tp: measure(args.model, tp, batches, args.new_tokens, args.repeats) for tp in map(int, args.tp.split(","))}
    print("decode ms/token: greedy (argmax + log-probability to rank 0) vs full (all logits to rank 0)")
    for tp, row in rows.items():
        cells = ", ".join(f"b={b}: {row[f'greedy_b{b}']:.2f} vs {row[f'full_b{b}']:.2f}" for b in batches)
        print(f"  TP={tp}: {cells}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "logits_to_leader.json"
    path.write_text(json.dumps({"machine": machine_info(), "model": args.model, "new_tokens": args.new_tokens,
                                "repeats": args.repeats, "decode_ms_per_token": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
