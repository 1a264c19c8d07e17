"""Serving throughput and latency at several concurrency levels, like vLLM's benchmark_serving.

    python benchmarks/serving.py [--model smollm2-135m] [--tp 1,2,1x2,1x1x2] [--concurrency 1,4,16,32]
                                 [--requests 64] [--max-tokens 32] [--prompt-words N]
                                 [--variant NAME="SERVE FLAGS" ...] [--out bench-out]
                                 [--llama-server GGUF [--llama-type F32] [--llama-threads N] [--llama-parallel 16]]

For each layout (a TP degree, ``TxP``: tp x pp pipeline stages, or ``TxPxD``: D replicas of that
behind one endpoint, ``--dp D``), starts ``tensorpar serve`` on a free loopback port, then for each
concurrency level sends ``--requests`` streaming completions (greedy, ``--max-tokens`` each,
ignore_eos so every request makes the same number of tokens) from that many client threads at
once. Reports output tokens/s, time to first token and inter-token latency (p50 / p99), prints a
table and writes ``serving.json``. ``--prompt-words N`` makes each prompt longer by N filler words
(about N tokens); ``--copy`` sends prompts whose answers repeat a passage of them instead
(``benchmarks/speculative.py``'s copy workload); each ``--variant`` starts every layout once more with extra ``tensorpar serve``
flags (say ``--variant whole="--no-chunked-prefill"``), its rows labelled with its name. Prefix
caching is off, since the prompts repeat and each is meant to be computed (a variant may give
``--prefix-caching``).

``--llama-server GGUF`` (a file, or a model name such as ``smollm2-135m``: its GGUF file) adds the
current llama.cpp build's server as a peer (``make peers``; found as ``tensorpar bench`` finds
``llama-bench``: ``$TENSORPAR_LLAMA_CPP``, else ``.peers/llama.cpp/bin``): ``llama-server -m GGUF
-t THREADS -np PARALLEL -cb -c PARALLEL*2048 --no-cache-prompt`` on a free loopback port, the same
requests through the same client (with ``n_predict`` beside ``max_tokens``), its rows labelled
``llama-server``. ``--llama-type F32`` (or ``Q8_0``, ...) runs the file written as that type by
``llama-quantize`` (once, cached): ``tensorpar serve`` runs float32 unless told otherwise, so
``F32`` is the like-for-like comparison. Its log goes to ``OUT/llama-server.log``; it is stopped on
the way out, on an error or Ctrl-C too. ``--tp ''`` measures llama-server alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import signal
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


def one_request(base: str, model: str, prompt: str, max_tokens: int, n_predict: bool = False) -> dict:
    """One streaming greedy completion of ``max_tokens`` (EOS ignored); ``n_predict``: say it also
    under llama-server's own name, which that server reads before ``max_tokens``."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    if n_predict:
        body["n_predict"] = max_tokens
    t0 = time.perf_counter()
    stamps, text, finish = [], [], None
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
                    text.append(chunk["choices"][0]["text"])
                if chunk.get("choices"):
                    finish = chunk["choices"][0].get("finish_reason") or finish
    return {"ttft": stamps[0] - t0 if stamps else float("nan"),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps), "e2e": time.perf_counter() - t0,
            "stamps": stamps, "text": "".join(text), "finish": finish}


def run_level(base: str, model: str, concurrency: int, requests: int, max_tokens: int, filler: str = "",
              n_predict: bool = False, prompts: list[str] = PROMPTS) -> dict:
    todo = list(range(requests))
    lock = threading.Lock()
    results = []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            res = one_request(base, model, filler + prompts[i % len(prompts)], max_tokens, n_predict)
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    return {
        "concurrency": concurrency, "requests": len(results), "wall_s": wall,
        "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
        "ttft_ms": {"p50": 1e3 * statistics.median(ttft), "p99": 1e3 * percentile(ttft, 99)},
        "itl_ms": {"p50": 1e3 * statistics.median(itl), "p99": 1e3 * percentile(itl, 99)},
    }


def label(row: dict) -> str:
    if row.get("server") == "llama-server":
        return f"llama-server {row['llama_type']} t={row['threads']} np={row['parallel']}"
    return f"tp={row['tp']} pp={row['pp']} dp={row['dp']} {row['variant']}"


def row_line(row: dict) -> str:
    return (f"{label(row)} concurrency={row['concurrency']:>3}: {row['output_tokens_per_s']:7.1f} output tok/s | "
            f"TTFT p50 {row['ttft_ms']['p50']:7.1f} p99 {row['ttft_ms']['p99']:7.1f} ms | "
            f"ITL p50 {row['itl_ms']['p50']:6.1f} p99 {row['itl_ms']['p99']:6.1f} ms")


def run_levels(base: str, model: str, levels: list[int], requests: int, max_tokens: int, filler: str, fields: dict,
               rows: list[dict], n_predict: bool = False, prompts: list[str] = PROMPTS) -> None:
    # warm-up: the KV blocks a level uses touched
    run_level(base, model, max(levels), max(levels), 4, filler, n_predict, prompts)
    for c in levels:
        row = {**fields, **run_level(base, model, c, max(requests, c), max_tokens, filler, n_predict, prompts)}
        rows.append(row)
        print(row_line(row), flush=True)


def prepare_llama_server(args) -> dict:
    """Find llama-server, resolve (and if asked convert) its file, before anything runs: a missing
    binary is one line at the start, not after the tensorpar layouts."""
    from tensorpar.bench import llama_bin
    from tensorpar.bench.processes import run_with_timeout
    from tensorpar.bench.run import cores
    from tensorpar.loading import resolve_model

    bin_dir = llama_bin.find_bin_dir("llama-server")
    if bin_dir is None:
        raise SystemExit(llama_bin.absent_message("llama-server"))
    gguf = Path(resolve_model(args.llama_server))
    own = llama_bin.file_type(gguf)
    if args.llama_type not in ("native", own):
        quantize = llama_bin.find_bin_dir("llama-quantize")
        if quantize is None:
            raise SystemExit(llama_bin.absent_message("llama-quantize"))
        gguf = llama_bin.converted(quantize, gguf, args.llama_type, log=lambda m: print(m, flush=True))
        own = args.llama_type
    _, version, err = run_with_timeout([str(bin_dir / "llama-server"), "--version"], 30)
    version = " ".join(ln.split(":", 1)[1].strip() for ln in (version + err).splitlines() if ln.startswith("version:"))
    return {"bin_dir": bin_dir, "gguf": gguf, "file_type": own, "threads": args.llama_threads or cores(),
            "version": version}


def run_llama_server(args, peer: dict, levels: list[int], filler: str, out: Path, rows: list[dict],
                     prompts: list[str] = PROMPTS) -> None:
    """llama-server as a peer (see the module's docstring), stopped on the way out whatever happens."""
    from tensorpar.bench import llama_bin
    from tensorpar.distributed.host import free_port

    port = free_port()
    alias = peer["gguf"].name
    cmd = llama_bin.server_command(peer["bin_dir"], peer["gguf"], peer["threads"], port, args.llama_parallel,
                                   alias=alias, extra=shlex.split(args.llama_args))
    print(f"llama-server ({peer['version'] or 'version unknown'}): {shlex.join(cmd)}", flush=True)
    fields = {"server": "llama-server", "variant": "llama-server", "gguf": str(peer["gguf"]),
              "llama_type": peer["file_type"] or args.llama_type, "threads": peer["threads"],
              "parallel": args.llama_parallel, "server_command": cmd, "version": peer["version"]}
    with llama_bin.LlamaServer(cmd, port, out / "llama-server.log") as base:
        run_levels(base, alias, levels, args.requests, args.max_tokens, filler, fields, rows, n_predict=True,
                   prompts=prompts)


def summary(rows: list[dict]) -> str:
    from tensorpar.bench.report import table

    return table(["server", "concurrency", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"],
                 [[label(r), r["concurrency"], f"{r['output_tokens_per_s']:.1f}", f"{r['ttft_ms']['p50']:.1f}",
                   f"{r['ttft_ms']['p99']:.1f}", f"{r['itl_ms']['p50']:.1f}", f"{r['itl_ms']['p99']:.1f}"]
                  for r in rows])


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # so that the servers started are stopped on the way out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", default="1,2", help="tensorpar layouts, comma-separated ('': none, llama-server alone)")
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=0, help="filler words before each prompt (about a token each)")
    ap.add_argument("--copy", action="store_true",
                    help="prompts whose answers repeat a passage of them (benchmarks/speculative.py's copy workload)")
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                    help="also run every layout with these extra serve flags (repeatable)")
    ap.add_argument("--llama-server", metavar="GGUF", default=None,
                    help="also measure llama-server (the current llama.cpp build, `make peers`) on this GGUF file "
                         "or model name")
    ap.add_argument("--llama-type", default="native",
                    help="native (the file as it is, default) or a type llama-quantize writes it as: F32, Q8_0, ...")
    ap.add_argument("--llama-threads", type=int, default=None, help="llama-server -t (default: the cores)")
    ap.add_argument("--llama-parallel", type=int, default=16, help="llama-server -np: its slots (default: 16)")
    ap.add_argument("--llama-args", default="", help="more llama-server flags, one string")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    from tensorpar.bench.run import machine_info
    from tensorpar.distributed.host import free_port

    variants = [("default", [])] + [(v.split("=", 1)[0], shlex.split(v.split("=", 1)[1])) for v in args.variant]
    filler = "word " * args.prompt_words
    prompts = PROMPTS
    if args.copy:
        from speculative import WORKLOADS  # (benchmarks/speculative.py, beside this script)

        prompts = WORKLOADS["copy"]
    levels = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    peer = prepare_llama_server(args) if args.llama_server else None
    layouts = [layout for layout in args.tp.split(",") if layout.strip()]
    for layout, (name, extra) in [(layout, v) for layout in layouts for v in variants]:
        tp, pp, dp = [int(v) for v in layout.split("x")] + [1] * (3 - len(layout.split("x")))
        port = free_port()
        proc = start(args.model, tp, pp, dp, port, ["--no-prefix-caching", *extra])  # (prompts repeat: compute each)
        base = f"http://127.0.0.1:{port}"
        try:
            fields = {"server": "tensorpar", "tp": tp, "pp": pp, "dp": dp, "variant": name, "serve_flags": extra}
            run_levels(base, args.model, levels, args.requests, args.max_tokens, filler, fields, rows, prompts=prompts)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if peer:
        run_llama_server(args, peer, levels, filler, out, rows, prompts)
    print("\n" + summary(rows))
    (out / "serving.json").write_text(json.dumps({
        "benchmark": "serving", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "machine": machine_info(), "model": args.model, "max_tokens": args.max_tokens,
        "prompt_words": args.prompt_words, "copy": args.copy, "llama_server": args.llama_server, "rows": rows},
        indent=2))
    print(f"wrote {out / 'serving.json'}")


if __name__ == "__main__":
    main()
