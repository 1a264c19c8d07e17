"""Batch-1 decode of tensorpar beside the current llama.cpp (``make peers``), interleaved, in one run.

    python benchmarks/decode_vs_llama_cpp.py [--model smollm2-135m] [--tp 1,2] [--quantization none,gguf,int8]
                                             [--rounds 3] [--new-tokens 64] [--json FILE]

Each round runs, for every quantization, ``tensorpar generate --tp N --quantization Q --json``
(64 new tokens after a 10-token prompt, EOS ignored; ``timings.decode_s_per_token``) at each TP
degree (``gguf+q8``: the file's blocks with ``TENSORPAR_Q8_ACTIVATIONS=1``, llama.cpp's arithmetic), then ``llama-bench -p 0 -n 64 -t 2 -r 1`` on the same file at the matching type (``none``:
F32 written by ``llama-quantize``; ``gguf``: the file's own; ``int8``: Q8_0), so slow drifts of a
shared machine fall on both alike. Reports the best of the rounds per row (ms/token) and the ratio
to llama.cpp; every figure of every round goes to ``--json``. The llama.cpp tools are found, and
the converted files cached, as ``tensorpar bench`` does (``tensorpar.bench.llama_bin``:
``$TENSORPAR_LLAMA_CPP``, else ``.peers/llama.cpp/bin``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

PROMPT = "Once upon a time, in a land far away,"
LLAMA_TYPE = {"none": "F32", "int8": "Q8_0", "gguf": None, "gguf+q8": None}  # +q8: TENSORPAR_Q8_ACTIVATIONS=1


def tensorpar_ms(model: str, tp: int, quantization: str, new_tokens: int) -> float:
    weights, _, q8 = quantization.partition("+")
    cmd = [sys.executable, "-m", "tensorpar", "generate", "--model", model, "--tp", str(tp), "--quantization",
           weights, "--prompt", PROMPT, "--max-new-tokens", str(new_tokens), "--ignore-eos", "--json", "--quiet"]
    env = dict(os.environ, TENSORPAR_Q8_ACTIVATIONS="1" if q8 == "q8" else "0")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True, env=env).stdout
    return json.loads(out)["timings"]["decode_s_per_token"] * 1e3


def llama_file(bin_dir: Path, gguf: Path, kind: str | None) -> Path:
    """The GGUF file llama.cpp runs for a quantization: the file itself, or one written once by llama-quantize."""
    from tensorpar.bench.llama_bin import converted

    return gguf if kind is None else converted(bin_dir, gguf, kind, log=lambda m: print(m, flush=True))


def llama_ms(bin_dir: Path, path: Path, new_tokens: int, threads: int) -> float:
    from tensorpar.bench.llama_bin import decode_ms, run_llama_bench

    return decode_ms(run_llama_bench(bin_dir, path, threads, new_tokens, repeats=1, timeout_s=900))["best"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tp", default="1,2")
    p.add_argument("--quantization", default="none,gguf,int8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from tensorpar.bench.llama_bin import absent_message, find_bin_dir
    from tensorpar.loading import resolve_model

    bin_dir = find_bin_dir("llama-bench")
    if bin_dir is None:
        sys.exit(absent_message("llama-bench"))

    gguf = Path(resolve_model(a.model))
    tps = [int(t) for t in a.tp.split(",")]
    quants = a.quantization.split(",")
    rows: dict[str, list[float]] = {}
    for r in range(a.rounds):
        for q in quants:
            for tp in tps:
                rows.setdefault(f"tensorpar {q} tp={tp}", []).append(tensorpar_ms(a.model, tp, q, a.new_tokens))
            kind = LLAMA_TYPE[q]
            rows.setdefault(f"llama.cpp {q} ({kind or 'file'})", []).append(
                llama_ms(bin_dir, llama_file(bin_dir, gguf, kind), a.new_tokens, os.cpu_count() or 1))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)
    print(f"\n{a.model}, batch 1, ms/token, best of {a.rounds} interleaved rounds")
    for q in quants:
        peer = min(rows[f"llama.cpp {q} ({LLAMA_TYPE[q] or 'file'})"])
        print(f"  {q:8s} llama.cpp {peer:6.2f}" + "".join(
            f"   tp={tp} {min(rows[f'tensorpar {q} tp={tp}']):6.2f} ({min(rows[f'tensorpar {q} tp={tp}']) / peer:.2f}x)"
            for tp in tps))
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "rounds": rows, "cpu": _cpu()}, indent=1))


def _cpu() -> str:
    try:
        return re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        return "unknown"


if __name__ == "__main__":
    main()
