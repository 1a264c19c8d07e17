"""Paged KV cache and prefix caching through the server: time to first token with a shared
system prompt cached and not, and how many sequences a fixed KV budget runs at once.

    python benchmarks/prefix_cache.py [--model smollm2-135m] [--tp 2] [--system-tokens 400]
                                      [--requests 12] [--budget-sequences 4] [--out bench-out]

1. **TTFT.** Starts ``tensorpar serve`` and sends ``--requests`` streaming chat requests one after
   another (``max_tokens`` 1: the first token is the whole answer), each with a system prompt of
   about ``--system-tokens`` tokens and its own short question. *uncached*: every request's system
   prompt begins with its own number, so no block is shared; *cached*: one system prompt for all,
   after one request that puts it in the cache. Reports the median TTFT of each, and the prefix
   cache's hit rate as ``/metrics`` gives it (``vllm:prefix_cache_hits`` over
   ``vllm:prefix_cache_queries``), once with ``--prefix-caching`` and once without.
2. **Concurrency in a fixed KV budget.** ``--kv-cache-memory`` is set to what
   ``--budget-sequences`` sequences of ``--max-model-len`` take: the number contiguous per-request
   slots of ``--max-model-len`` would fit. 32 requests of short prompts and 64 new tokens are sent
   at once; ``/metrics`` is sampled for ``vllm:num_requests_running``. *paged*: admission by free
   blocks; *slots*: the same server with ``--max-num-seqs`` set to ``--budget-sequences``, as
   contiguous slots would admit. Reports the peak number running and the output tokens/s of each.

Writes ``prefix_cache.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serving import start  # noqa: E402

WORDS = ("tensor parallel serving keeps every rank busy while the scheduler packs prompts and decodes into "
         "one step of the model across the devices").split()


def system_prompt(tokens: int, tag: str) -> str:
    """About ``tokens`` tokens of instructions, beginning with ``tag``."""
    return f"{tag}. You are a helpful assistant. " + " ".join(WORDS[i % len(WORDS)] for i in range(tokens - 12))


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def first_token_s(base: str, model: str, system: str, question: str) -> float:
    body = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 1, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line.replace(" ", "") and '"content":""' not in line.replace(" ", ""):
                return time.perf_counter() - t0
    return time.perf_counter() - t0


def ttft_run(args, caching: bool, port: int) -> dict:
    flags = ["--max-model-len", str(args.max_model_len), "--disable-log-requests"]
    flags += [] if caching else ["--no-prefix-caching"]
    proc = start(args.model, args.tp, 1, 1, port, flags)
    base = f"http://127.0.0.1:{port}"
    try:
        first_token_s(base, args.model, system_prompt(args.system_tokens, "Warm-up"), "Hello?")
        questions = [f"Question {i}: what is {i} plus {i + 1}?" for i in range(args.requests)]
        uncached = [first_token_s(base, args.model, system_prompt(args.system_tokens, f"Session {i}"), q)
                    for i, q in enumerate(questions)]
        shared = system_prompt(args.system_tokens, "Shared")
        first_token_s(base, args.model, shared, "Hello?")  # puts the shared prompt in the cache
        queries0, hits0 = metric(base, "vllm:prefix_cache_queries_total"), metric(base, "vllm:prefix_cache_hits_total")
        cached = [first_token_s(base, args.model, shared, q) for q in questions]
        queries = metric(base, "vllm:prefix_cache_queries_total") - queries0
        hits = metric(base, "vllm:prefix_cache_hits_total") - hits0
        prompt_tokens = len(httpx.post(f"{base}/tokenize", json={"model": args.model, "messages": [
            {"role": "system", "content": shared}, {"role": "user", "content": questions[0]}]}).json()["tokens"])
    finally:
        proc.terminate()
        proc.wait(60)
    return {"prefix_caching": caching, "prompt_tokens": prompt_tokens,
            "ttft_uncached_ms": round(statistics.median(uncached) * 1e3, 1),
            "ttft_shared_ms": round(statistics.median(cached) * 1e3, 1),
            "shared_hit_rate": round(hits / queries, 3) if queries else 0.0}


def concurrency_run(args, max_num_seqs: int, budget: int, port: int) -> dict:
    flags = ["--max-model-len", str(args.max_model_len), "--kv-cache-memory", str(budget), "--max-num-seqs",
             str(max_num_seqs), "--disable-log-requests"]
    proc = start(args.model, args.tp, 1, 1, port, flags)
    base = f"http://127.0.0.1:{port}"
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, int(metric(base, "vllm:num_requests_running")))
            time.sleep(0.05)

    def one(i):
        body = {"model": args.model, "prompt": f"Story {i}: once upon a time", "max_tokens": 64, "temperature": 0,
                "ignore_eos": True}
        httpx.post(f"{base}/v1/completions", json=body, timeout=600).raise_for_status()

    try:
        blocks = metric(base, "tensorpar_kv_cache_blocks")
        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        clients = [threading.Thread(target=one, args=(i,)) for i in range(32)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        wall = time.perf_counter() - t0
        done.set()
        watcher.join()
        preempted = metric(base, "vllm:num_preemptions_total")
    finally:
        proc.terminate()
        proc.wait(60)
    return {"max_num_seqs": max_num_seqs, "kv_blocks": blocks, "peak_running": peak,
            "output_tokens_per_s": round(32 * 64 / wall, 1), "preemptions": preempted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--system-tokens", type=int, default=400)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--budget-sequences", type=int, default=4)
    ap.add_argument("--kv-bytes-per-token", type=int, default=None,
                    help="KV bytes per position on a rank (default: computed from the model's config)")
    ap.add_argument("--port", type=int, default=8391)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    from tensorpar.loading import open_source

    cfg = open_source(args.model).config
    per_token = args.kv_bytes_per_token or 2 * cfg.num_layers * -(-cfg.num_kv_heads // args.tp) * cfg.head_dim * 4
    budget = args.budget_sequences * (args.max_model_len + 16) * per_token  # (+ the padding block)
    rows = {"ttft": [ttft_run(args, True, args.port), ttft_run(args, False, args.port + 1)],
            "concurrency": [concurrency_run(args, 32, budget, args.port + 2),
                            concurrency_run(args, args.budget_sequences, budget, args.port + 3)]}
    rows["kv_cache_memory_bytes"] = budget
    for r in rows["ttft"]:
        print(f"prefix caching {'on ' if r['prefix_caching'] else 'off'}: {r['prompt_tokens']}-token prompts, "
              f"TTFT uncached {r['ttft_uncached_ms']} ms, shared system prompt {r['ttft_shared_ms']} ms, "
              f"hit rate {r['shared_hit_rate']}")
    for r, name in zip(rows["concurrency"], ("paged", "slots")):
        print(f"{name}: KV budget {budget / 2**20:.1f} MiB per rank ({r['kv_blocks']:.0f} blocks), max-num-seqs "
              f"{r['max_num_seqs']}: peak running {r['peak_running']}, {r['output_tokens_per_s']} tok/s, "
              f"{r['preemptions']:.0f} preemptions")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows.update(date=datetime.date.today().isoformat(), model=args.model, tp=args.tp)
    (out / "prefix_cache.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
