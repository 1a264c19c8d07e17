"""The same ``tensorpar bench`` figures for two source trees, interleaved, on one machine in one run.

    python benchmarks/before_after.py --before OLD/src --after NEW/src [--tp 1,2,3] [--rounds 3] [--out DIR]

Each round runs ``tensorpar bench --no-peers --no-sweep`` once with ``PYTHONPATH=BEFORE`` and once
with ``PYTHONPATH=AFTER`` (alternating which goes first), so slow drifts of a shared machine fall
on both alike. Reports, per TP degree, the median over rounds of decode ms/token at each batch
size and of prefill tokens/s, and after / before. A tree is a ``src`` directory holding the
``tensorpar`` package (a ``git worktree`` of the earlier revision, say).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(src: Path, tp: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-c", "import sys; from tensorpar.cli.main import main; sys.argv[0] = 'tensorpar'; main()",
           "bench", "--tp", tp, "--no-peers", "--no-sweep", "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    return json.loads((out / "bench.json").read_text())


def figures(result: dict) -> dict:
    out = {}
    for row in result["tensorpar"]:
        if row["status"] != "ok":
            continue
        for b, ms in row["decode_ms_per_token"].items():
            out[f"TP={row['tp']} decode ms/token b={b}"] = ms
        out[f"TP={row['tp']} prefill tok/s"] = row["prefill_tokens_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, type=Path)
    ap.add_argument("--after", required=True, type=Path)
    ap.add_argument("--tp", default="1,2,3")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench-out", type=Path)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            for which in order:
                print(f"round {i + 1}: {which}", file=sys.stderr, flush=True)
                result = bench(getattr(args, which), args.tp, Path(tmp) / f"{which}-{i}")
                runs[which].append(figures(result))
    medians = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in runs.items()}
    print(f"{'figure':<32} | {'before':>8} | {'after':>8} | after/before")
    for key in medians["before"]:
        b, a = medians["before"][key], medians["after"].get(key)
        print(f"{key:<32} | {b:8.2f} | {a:8.2f} | {a / b:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "before_after.json"
    path.write_text(json.dumps({"before": str(args.before), "after": str(args.after), "rounds": runs,
                                "medians": medians}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
