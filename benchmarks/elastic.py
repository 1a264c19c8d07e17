"""How long the streams of ``tensorpar serve --elastic`` pause when a rank dies, on a real model.

    python benchmarks/elastic.py [--model smollm2-135m] [--tp 3] [--victims 0,1,2] [--streams 4]
                                 [--max-tokens 64] [--kill-after 1.0] [--out bench-out]

For each victim rank: starts ``tensorpar serve --tp N --elastic`` (``serving.start``), sends
``--streams`` streaming greedy completions of ``--max-tokens`` (EOS ignored) at once, SIGKILLs the
victim ``--kill-after`` seconds later (``mid_stream`` says whether every stream had tokens before
and after it), and records each stream's longest pause after the kill
(from the kill to its next token, or between two tokens after it), the restart time the server
logs (``serving again at tp=2 after X s``), and whether each text equals the same request sent
undisturbed afterwards (at tp N - 1). Prints a table and writes ``elastic.json``. The goal of
issue 31: at most 5 s for SmolLM2 on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import threading
import time
from pathlib import Path

import psutil
from serving import one_request, start

from tensorpar.distributed.host import free_port


def rank_pid(server: int, rank: int) -> int:
    """The pid of the server's rank ``rank`` (its process is named ``tensorpar-r<rank>``)."""
    for p in psutil.Process(server).children(recursive=True):
        if p.name() == f"tensorpar-r{rank}":
            return p.pid
    raise SystemExit(f"no rank {rank} under the server")


def one_fault(model: str, tp: int, victim: int, streams: int, max_tokens: int, kill_after: float) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(model, tp, 1, 1, port, ["--elastic", "--disable-log-requests"])
    try:
        prompts = [f"Story {i}: once upon a time" for i in range(streams)]
        results: list = [None] * streams

        def run(i: int) -> None:
            results[i] = one_request(base, model, prompts[i], max_tokens)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        time.sleep(kill_after)
        t_kill = time.perf_counter()
        os.kill(rank_pid(proc.pid, victim), signal.SIGKILL)
        for t in threads:
            t.join()
        pauses = []
        for r in results:
            times = [t_kill] + [s for s in r["stamps"] if s > t_kill]
            pauses.append(max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else float("nan"))
        again = [one_request(base, model, p, max_tokens)["text"] for p in prompts]
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    restart = re.search(r"serving again at (\S+) after ([\d.]+) s", err)
    return {"victim": victim, "tp": tp, "pause_s": pauses, "longest_pause_s": max(pauses),
            "restart_s": float(restart.group(2)) if restart else None, "now": restart.group(1) if restart else None,
            "finish": [r["finish"] for r in results], "tokens": [r["tokens"] for r in results],
            "mid_stream": all(r["stamps"][0] < t_kill < r["stamps"][-1] for r in results),
            "text_equal_to_undisturbed": [r["text"] == a for r, a in zip(results, again)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--victims", default="0,1,2")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kill-after", type=float, default=1.0, help="seconds after the streams start (default: 1)")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    rows = [one_fault(args.model, args.tp, int(v), args.streams, args.max_tokens, args.kill_after)
            for v in args.victims.split(",")]
    print(f"{'victim':>6} {'now':>5} {'restart s':>9} {'longest pause s':>15} {'all text equal':>14}")
    for r in rows:
        print(f"{r['victim']:>6} {r['now'] or '-':>5} {r['restart_s'] or float('nan'):>9.2f} {r['longest_pause_s']:>15.2f} "
              f"{str(all(r['text_equal_to_undisturbed'])):>14}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "elastic.json").write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "model": args.model, "streams": args.streams, "max_tokens": args.max_tokens,
        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
