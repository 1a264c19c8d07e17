"""Peak resident memory per rank at several TP degrees, against transformers in one process.

    python benchmarks/memory.py [--model smollm2-135m] [--tp 1,2,3] [--out bench-out]

Runs ``tensorpar generate --json`` once per degree (8 new tokens) and reads each rank's peak RSS
(VmHWM); runs transformers on the same checkpoint in a fresh process as the peer. Prints a table
and writes ``memory.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

PEER = r"""
import sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from tensorpar.loading import resolve_model
from tensorpar.process import peak_rss_mb
path = resolve_model(sys.argv[1])
kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
where = path.parent if path.suffix == ".gguf" else path
tok = AutoTokenizer.from_pretrained(where, **kw)
model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw).eval()
ids = tok("Once upon a time", return_tensors="pt").input_ids
with torch.no_grad():
    model.generate(ids, max_new_tokens=8, do_sample=False)
print(peak_rss_mb())
"""


def run_tensorpar(model: str, tp: int) -> dict:
    exe = Path(sys.executable).with_name("tensorpar")
    r = subprocess.run(
        [str(exe), "generate", "--model", model, "--tp", str(tp), "--json", "--max-new-tokens", "8",
         "--prompt", "Once upon a time"],
        capture_output=True, text=True, timeout=600,
    )
    if r.returncode != 0:
        raise SystemExit(f"tensorpar generate --tp {tp} failed:\n{r.stderr}")
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", default="1,2,3")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    degrees = [int(t) for t in args.tp.split(",")]

    peer = subprocess.run([sys.executable, "-c", PEER, args.model], capture_output=True, text=True, timeout=600)
    if peer.returncode != 0:
        raise SystemExit(f"transformers peer failed:\n{peer.stderr}")
    peer_mb = float(peer.stdout.strip().splitlines()[-1])

    rows = []
    for tp in degrees:
        out = run_tensorpar(args.model, tp)
        rows.append({"tp": tp, "peak_rss_mb": out["peak_rss_mb"], "load_s": out["timings"]["load_s"],
                     "decode_ms_per_token": 1e3 * out["timings"]["decode_s_per_token"]})
    base = max(rows[0]["peak_rss_mb"]) if rows and rows[0]["tp"] == 1 else None

    print(f"model {args.model}; transformers (one process) peak RSS {peer_mb:.0f} MiB")
    print(f"{'tp':>3} | {'peak RSS per rank (MiB)':<32} | {'max rank vs TP=1':>16} | {'max rank vs transformers':>24}"
          f" | {'load s':>6} | {'decode ms/token':>15}")
    for r in rows:
        top = max(r["peak_rss_mb"])
        vs1 = f"{top - base:+.0f} MiB" if base else "-"
        print(f"{r['tp']:>3} | {', '.join(f'{m:.0f}' for m in r['peak_rss_mb']):<32} | {vs1:>16} | {top / peer_mb:>23.2f}x"
              f" | {r['load_s']:>6.1f} | {r['decode_ms_per_token']:>15.1f}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "memory",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "model": args.model,
        "transformers_peak_rss_mb": peer_mb,
        "tensorpar": rows,
    }
    (out_dir / "memory.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out_dir / 'memory.json'}")


if __name__ == "__main__":
    main()
