"""Mixed precision against float32: the loss curves of `tensorpar train --dtype bf16` and of the
same run in float32, on real text, and their tokens/s.

    python benchmarks/train_bf16.py [--model random-llama-tiny-6l] [--data README.md] [--steps 200]
                                    [--tp 2] [--seq-len 128] [--batch 8] [--lr 1e-3] [--eval-every 50]
                                    [--out bench-out]

Both runs start from the same weights and see the same batches (the batch of a step depends only
on the seed and the step). Reports each run's mean loss over its last 10 steps, its loss on the
held-out tenth of the text (``--eval-every``; the same rows for both, so it does not swing with
the batch) at the end, and their relative differences; writes ``train_bf16.json`` and
``train_bf16.png`` (both curves, training and held-out).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random-llama-tiny-6l")
    p.add_argument("--data", default="README.md")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", default="bench-out")
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tensorpar.bench.run import machine_info
    from tensorpar.train.run import run_training
    from tensorpar.train.trainer import TrainConfig

    out = Path(args.out)
    runs = {}
    for dtype in ("fp32", "bf16"):
        print(f"tensorpar train --dtype {dtype} ({args.steps} steps at tp={args.tp})", flush=True)
        cfg = TrainConfig(data=args.data, model=args.model, tp=args.tp, steps=args.steps, seq_len=args.seq_len,
                          batch=args.batch, lr=args.lr, dtype=dtype, seed=0, eval_every=args.eval_every)
        runs[dtype] = run_training(cfg, out / f"train-{dtype}", progress=True)
    tail = {d: sum(r["losses"][-10:]) / len(r["losses"][-10:]) for d, r in runs.items()}
    difference = (tail["bf16"] - tail["fp32"]) / tail["fp32"]
    held_out = {d: r["eval"][-1]["loss"] for d, r in runs.items()}
    held_out_difference = (held_out["bf16"] - held_out["fp32"]) / held_out["fp32"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for dtype, r in runs.items():
        line, = ax.plot(r["steps"], r["losses"], label=f"{dtype}: {r['tokens_per_s']:,.0f} tokens/s")
        ax.plot([e["step"] for e in r["eval"]], [e["loss"] for e in r["eval"]], "o--", color=line.get_color(),
                label=f"{dtype}, held out")
    ax.set(xlabel="optimizer step", ylabel="training loss", title=f"{args.model} on {Path(args.data).name}, tp={args.tp}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "train_bf16.png", dpi=120)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "args": vars(args), "last10_mean_loss": tail,
              "relative_difference": difference, "held_out_loss": held_out,
              "held_out_relative_difference": held_out_difference,
              "tokens_per_s": {d: r["tokens_per_s"] for d, r in runs.items()},
              "losses": {d: r["losses"] for d, r in runs.items()}}
    (out / "train_bf16.json").write_text(json.dumps(result, indent=1))
    print(f"mean loss of the last 10 steps: fp32 {tail['fp32']:.4f}, bf16 {tail['bf16']:.4f} "
          f"({difference:+.2%}); held-out loss at the end: fp32 {held_out['fp32']:.4f}, bf16 "
          f"{held_out['bf16']:.4f} ({held_out_difference:+.2%}); tokens/s fp32 {runs['fp32']['tokens_per_s']:,.0f}, "
          f"bf16 {runs['bf16']['tokens_per_s']:,.0f}")
    print(f"wrote {out / 'train_bf16.json'}, {out / 'train_bf16.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
