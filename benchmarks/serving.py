"""Serving throughput and latency at several concurrency levels, like vLLM's benchmark_serving.

    python benchmarks/serving.py [--model smollm2-135m] [--tp 1,2,1x2,1x1x2] [--concurrency 1,4,16,32]
                                 [--requests 64] [--max-tokens 32] [--prompt-words N]
                                 [--variant NAME="SERVE FLAGS" ...] [--out bench-out]

For each layout (a TP degree, ``TxP``: tp x pp pipeline stages, or ``TxPxD``: D replicas of that
behind one endpoint, ``--dp D``), starts ``tensorpar serve`` on a free loopback port, then for each
concurrency level sends ``--requests`` streaming completions (greedy, ``--max-tokens`` each,
ignore_eos so every request makes the same number of tokens) from that many client threads at
once. Reports output tokens/s, time to first token and inter-token latency (p50 / p99), prints a
table and writes ``serving.json``. ``--prompt-words N`` makes each prompt longer by N filler words
(about N tokens); each ``--variant`` starts every layout once more with extra ``tensorpar serve``
flags (say ``--variant whole="--no-chunked-prefill"``), its rows labelled with its name. Prefix
caching is off, since the prompts repeat and each is meant to be computed (a variant may give
``--prefix-caching``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PROMPTS = ["Once upon a time", "The history of the printing press", "def quicksort(xs):",
           "Tensor parallelism splits", "My favourite recipe is", "In the beginning"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def start(model: str, tp: int, pp: int, dp: int, port: int, extra: list[str] = ()) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("tensorpar")
    proc = subprocess.Popen([str(exe), "serve", "--model", model, "--tp", str(tp), "--pp", str(pp), "--dp", str(dp),
                             "--port", str(port), "--max-num-seqs", "32", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server failed: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start")


def one_request(base: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    stamps = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0 if stamps else float("nan"),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps), "e2e": time.perf_counter() - t0}


def run_level(base: str, model: str, concurrency: int, requests: int, max_tokens: int, filler: str = "") -> dict:
    todo = list(range(requests))
    lock = threading.Lock()
    results = []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            res = one_request(base, model, filler + PROMPTS[i % len(PROMPTS)], max_tokens)
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    return {
        "concurrency": concurrency, "requests": len(results), "wall_s": wall,
        "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_ms": {"p50": 1e3 * statistics.median(ttft), "p99": 1e3 * percentile(ttft, 99)},
        "itl_ms": {"p50": 1e3 * statistics.median(itl), "p99": 1e3 * percentile(itl, 99)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=0, help="filler words before each prompt (about a token each)")
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                    help="also run every layout with these extra serve flags (repeatable)")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    import shlex

    from tensorpar.bench.run import machine_info
    from tensorpar.distributed.host import free_port

    variants = [("default", [])] + [(v.split("=", 1)[0], shlex.split(v.split("=", 1)[1])) for v in args.variant]
    filler = "word " * args.prompt_words
    rows = []
    for layout, (name, extra) in [(layout, v) for layout in args.tp.split(",") for v in variants]:
        tp, pp, dp = [int(v) for v in layout.split("x")] + [1] * (3 - len(layout.split("x")))
        port = free_port()
        proc = start(args.model, tp, pp, dp, port, ["--no-prefix-caching", *extra])  # (prompts repeat: compute each)
        base = f"http://127.0.0.1:{port}"
        try:
            levels = [int(c) for c in args.concurrency.split(",")]
            run_level(base, args.model, max(levels), max(levels), 4, filler)  # warm-up: the KV blocks a level uses touched
            for c in levels:
                row = {"tp": tp, "pp": pp, "dp": dp, "variant": name, "serve_flags": extra,
                       **run_level(base, args.model, c, max(args.requests, c), args.max_tokens, filler)}
                rows.append(row)
                print(f"tp={tp} pp={pp} dp={dp} {name} concurrency={c:>3}: {row['output_tokens_per_s']:7.1f} output "
                      f"tok/s | TTFT p50 {row['ttft_ms']['p50']:7.1f} p99 {row['ttft_ms']['p99']:7.1f} ms | "
                      f"ITL p50 {row['itl_ms']['p50']:6.1f} p99 {row['itl_ms']['p99']:6.1f} ms", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps({
        "benchmark": "serving", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "machine": machine_info(), "model": args.model, "max_tokens": args.max_tokens,
        "prompt_words": args.prompt_words, "rows": rows}, indent=2))
    print(f"wrote {out / 'serving.json'}")


if __name__ == "__main__":
    main()
