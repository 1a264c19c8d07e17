"""Deterministic mode on a real model: are the logits bitwise equal at every degree, and what
does the mode cost?

    python benchmarks/deterministic.py [--model smollm2-135m] [--tp 1,2,3] [--also gemma3-270m:1,2,4]
                                       [--greedy-tokens 256] [--cost-tp 1,2] [--prompt-tokens 512]
                                       [--new-tokens 64] [--train-steps 4] [--out bench-out]

Equality: for each ``--tp`` (and each ``--also`` model at its degrees), ``LLM(deterministic=True)
.score`` of a 64-token prompt, compared with ``torch.equal`` against the first degree's, and the
greedy tokens of ``--greedy-tokens`` from it. Cost (``--model``): for
each ``--cost-tp``, with and without the mode (interleaved, in one process each), prefill
tokens/s of a ``--prompt-tokens`` prompt (the prefix cache off: every run computes it all) and
decode ms/token of ``--new-tokens`` tokens, each the best of 3; and ``tensorpar train``'s
tokens/s over ``--train-steps`` steps of 4 x 128 tokens, with and without ``--deterministic``.
Prints a table and writes ``deterministic.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from tensorpar import LLM, SamplingParams

TEXT = ("Tensor parallelism splits each weight matrix of a transformer across devices, so that a model too large "
        "or too slow for one device runs on several. ")


def equality(model: str, degrees: list[int], new_tokens: int) -> list[dict]:
    """Each degree's logits and greedy tokens against the first degree's."""
    rows, first = [], None
    for tp in degrees:
        with LLM(model, tp=tp, deterministic=True, progress=False) as llm:
            text = TEXT * 3
            logits = llm.score([text])[0][:64]
            tokens = llm.generate([text], max_new_tokens=new_tokens, ignore_eos=True)[0].token_ids
        if first is None:
            first = (logits, tokens)
        rows.append({"model": model, "tp": tp, "logits_bitwise_equal_to_tp1": bool(torch.equal(logits, first[0])),
                     "max_abs_difference": float((logits - first[0]).abs().max()),
                     "tokens_equal_to_tp1": tokens == first[1]})
    return rows


def cost(model: str, tp: int, prompt_tokens: int, new_tokens: int) -> dict:
    out = {"tp": tp}
    for mode in (False, True):
        with LLM(model, tp=tp, deterministic=mode, progress=False, prefix_caching=False) as llm:
            prompt = (TEXT * (prompt_tokens // 20 + 1))
            prefill, decode = [], []
            for _ in range(3):
                long = llm.generate_full([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))
                n = len(long.completions[0].prompt_token_ids)
                prefill.append(n / long.timings["prefill_s"])
                short = llm.generate_full(["Once upon a time"], SamplingParams(max_new_tokens=new_tokens,
                                                                               ignore_eos=True))
                decode.append(1e3 * short.timings["decode_s_per_token"])
        key = "deterministic" if mode else "default"
        out[key] = {"prefill_tokens_per_s": max(prefill), "decode_ms_per_token": min(decode), "prompt_tokens": n}
    out["decode_ratio"] = out["deterministic"]["decode_ms_per_token"] / out["default"]["decode_ms_per_token"]
    out["prefill_ratio"] = out["default"]["prefill_tokens_per_s"] / out["deterministic"]["prefill_tokens_per_s"]
    return out


def training_cost(model: str, tp: int, steps: int, workdir: Path) -> dict:
    """``tensorpar train`` tokens/s over its steps, with and without ``--deterministic``."""
    import subprocess
    import sys

    corpus = workdir / "corpus.txt"
    corpus.write_text(TEXT * 400)
    out = {"tp": tp}
    for flag in ("", "--deterministic"):
        cmd = [sys.executable, "-m", "tensorpar", "train", "--model", model, "--data", str(corpus), "--tp", str(tp),
               "--seq-len", "128", "--batch", "4", "--steps", str(steps), "--json", "--out", str(workdir / "train")]
        r = subprocess.run(cmd + ([flag] if flag else []), capture_output=True, text=True, check=True)
        result = json.loads(r.stdout)
        out["deterministic" if flag else "default"] = {"tokens_per_s": result["tokens_per_s"], "losses": result["losses"]}
    out["ratio"] = out["default"]["tokens_per_s"] / out["deterministic"]["tokens_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", default="1,2,3")
    ap.add_argument("--also", nargs="*", default=["gemma3-270m:1,2,4"], metavar="MODEL:TPS")
    ap.add_argument("--greedy-tokens", type=int, default=256)
    ap.add_argument("--cost-tp", default="1,2")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    equal = equality(args.model, [int(t) for t in args.tp.split(",")], args.greedy_tokens)
    for also in args.also:
        name, degrees = also.rsplit(":", 1)
        equal += equality(name, [int(t) for t in degrees.split(",")], args.greedy_tokens)
    for r in equal:
        print(f"{r['model']} tp={r['tp']}: logits bitwise equal to tp=1: {r['logits_bitwise_equal_to_tp1']} "
              f"(max |diff| {r['max_abs_difference']:.3g}), greedy tokens equal: {r['tokens_equal_to_tp1']}")
    costs = [cost(args.model, int(t), args.prompt_tokens, args.new_tokens) for t in args.cost_tp.split(",") if t]
    for c in costs:
        d, x = c["default"], c["deterministic"]
        print(f"tp={c['tp']}: decode {d['decode_ms_per_token']:.1f} -> {x['decode_ms_per_token']:.1f} ms/token "
              f"({c['decode_ratio']:.2f}x), prefill {d['prefill_tokens_per_s']:.0f} -> {x['prefill_tokens_per_s']:.0f} "
              f"tokens/s ({c['prefill_ratio']:.2f}x the time)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:  # (the corpus and the runs' loss curves)
        training = [training_cost(args.model, int(t), args.train_steps, Path(work)) for t in args.cost_tp.split(",") if t]
    for c in training:
        print(f"train tp={c['tp']}: {c['default']['tokens_per_s']:.0f} -> {c['deterministic']['tokens_per_s']:.0f} "
              f"tokens/s ({c['ratio']:.2f}x the time)")
    (out / "deterministic.json").write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "model": args.model, "equality": equal, "cost": costs, "training": training},
        indent=1))


if __name__ == "__main__":
    main()
