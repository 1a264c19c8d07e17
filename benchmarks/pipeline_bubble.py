"""Stage utilisation of a pipeline: the fraction of a ``generate`` call each stage spends
computing, at 1, 4 and 16 concurrent sequences, beside the decode speed of the same layout and
of tp=1 (SmolLM2-135M, greedy, 32 new tokens from short prompts).

    .venv/bin/python benchmarks/pipeline_bubble.py [--layouts 1x1,1x2,2x1] [--out FILE.json]
"""

import argparse
import json

if __name__ == "__main__":
    from tensorpar import LLM, SamplingParams

    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="1x1,1x2,2x1", help="tp x pp pairs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    sp = SamplingParams(max_new_tokens=32, ignore_eos=True)
    for layout in args.layouts.split(","):
        tp, pp = (int(v) for v in layout.split("x"))
        with LLM("smollm2-135m", tp=tp, pp=pp, progress=False) as llm:
            llm.generate_full(["warm up"], SamplingParams(max_new_tokens=4))
            for concurrency in (1, 4, 16):
                prompts = [f"Story {i}: once upon a time" for i in range(concurrency)]
                r = llm.generate_full(prompts, sp)
                step = r.timings["decode_s_per_token"]
                row = {"tp": tp, "pp": pp, "concurrency": concurrency, "decode_ms_per_step": round(step * 1e3, 2),
                       "tokens_per_s": round(concurrency / step, 1) if step else None,
                       "stage_busy": [round(b, 3) for b in r.stage_busy]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
