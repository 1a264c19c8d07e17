"""Speculative decoding on a real model: decode ms/token with and without n-gram drafts, where the
answer copies its prompt and where it has nothing to copy, against llama.cpp's own n-gram
speculation on the same file and prompts.

    python benchmarks/speculative.py [--model smollm2-135m] [--tp 2] [--k 4] [--lookup 2,4]
                                     [--new-tokens 128] [--repeats 2] [--llama-type F32]
                                     [--llama-threads N] [--no-llama] [--out bench-out]

Workloads (``WORKLOADS``), each a few prompts run one at a time (batch 1, greedy, EOS ignored so
that every run makes ``--new-tokens`` tokens):

- ``copy``: the answer repeats a passage of the prompt (an edit of a passage, an extraction from a
  document): the passage, then an instruction to write it out again, and its first words;
- ``free``: open-ended prompts with nothing to copy (the cost of proposing and missing).

tensorpar: ``LLM(model, tp=T)`` without speculation and with ``{"method": "ngram",
"num_speculative_tokens": K, "prompt_lookup_min": LO, "prompt_lookup_max": HI}``, one process
each, the best of ``--repeats`` of each prompt's decode ms/token (``timings["decode_s_per_token"]``:
decode seconds over the tokens each sequence received), the acceptance rate, and whether the
tokens equal those without speculation. llama.cpp: ``llama-server`` (``make peers``) on the model's
GGUF file written as ``--llama-type`` (F32: tensorpar's precision), with ``-t`` threads (default:
all cores) and without or with ``--spec-type ngram-simple --spec-ngram-simple-size-n LO
--spec-ngram-simple-size-m K``, the same prompts through ``/completion``; its ms/token is its own
``timings.predicted_per_token_ms``, its acceptance ``draft_n_accepted / draft_n``. Prints a table
and writes ``speculative.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

PASSAGE = ("The committee met on Tuesday to review the budget for the new library. After a long discussion, the "
           "members agreed to fund the children's reading room, to extend the opening hours on weekends, and to "
           "replace the old heating system before the winter. The chair thanked the volunteers who had collected "
           "signatures from more than two thousand residents, and promised a public meeting in the spring.")
NOTES = ("Meeting notes: the river path will close for repairs from May to July. Cyclists should use the bridge on "
         "Mill Street. The council will publish a map of the detour on its website and at the town hall.")
WORKLOADS = {
    "copy": [f"{PASSAGE}\n\nWrite the passage above out again, word for word.\n\n{PASSAGE[:60]}",
             f"{NOTES}\n\nCopy the notes exactly:\n\n{NOTES[:40]}"],
    "free": ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
             "Explain why the sky is blue to a ten year old."],
}


def tensorpar_rows(model: str, tp: int, config: dict | None, new_tokens: int, repeats: int) -> dict:
    from tensorpar import LLM, SamplingParams

    sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    out = {}
    with LLM(model, tp=tp, progress=False, prefix_caching=False, speculative_config=config) as llm:
        llm.generate_full([WORKLOADS["free"][0]], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
        for name, prompts in WORKLOADS.items():
            rows = []
            for prompt in prompts:
                runs = [llm.generate_full([prompt], sp) for _ in range(repeats)]
                best = min(runs, key=lambda r: r.timings["decode_s_per_token"])
                rows.append({"ms_per_token": best.timings["decode_s_per_token"] * 1e3,
                             "tokens": best.completions[0].token_ids, "speculation": best.speculation,
                             "text": best.completions[0].text[:200]})
            out[name] = rows
    return out


def llama_rows(gguf: Path, bin_dir: Path, threads: int, extra: list[str], new_tokens: int, repeats: int,
               log: Path) -> dict:
    import httpx

    from tensorpar.bench import llama_bin
    from tensorpar.distributed.host import free_port

    port = free_port()
    cmd = llama_bin.server_command(bin_dir, gguf, threads, port, parallel=1, ctx_per_slot=4096, extra=extra)
    out = {"command": cmd}
    with llama_bin.LlamaServer(cmd, port, log) as base:
        httpx.post(f"{base}/completion", json={"prompt": "Hello", "n_predict": 8}, timeout=300)  # warm-up
        for name, prompts in WORKLOADS.items():
            rows = []
            for prompt in prompts:
                best = None
                for _ in range(repeats):
                    r = httpx.post(f"{base}/completion", json={"prompt": prompt, "n_predict": new_tokens,
                                                               "temperature": 0, "ignore_eos": True,
                                                               "cache_prompt": False}, timeout=600).json()
                    t = r["timings"]
                    row = {"ms_per_token": t["predicted_per_token_ms"], "draft_n": t.get("draft_n", 0),
                           "draft_n_accepted": t.get("draft_n_accepted", 0), "text": r["content"][:200]}
                    if best is None or row["ms_per_token"] < best["ms_per_token"]:
                        best = row
                rows.append(best)
            out[name] = rows
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--lookup", default="2,4", help="prompt_lookup_min,prompt_lookup_max")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--llama-type", default="F32")
    p.add_argument("--llama-threads", type=int, default=None)
    p.add_argument("--no-llama", dest="llama", action="store_false")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args()
    lo, hi = (int(v) for v in args.lookup.split(","))
    config = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": lo, "prompt_lookup_max": hi}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from tensorpar.bench.run import machine_info

    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "model": args.model, "tp": args.tp, "speculative_config": config,
              "new_tokens": args.new_tokens}
    print(f"tensorpar tp={args.tp}, no speculation", flush=True)
    result["tensorpar"] = {"off": tensorpar_rows(args.model, args.tp, None, args.new_tokens, args.repeats)}
    print(f"tensorpar tp={args.tp}, {json.dumps(config)}", flush=True)
    result["tensorpar"]["ngram"] = tensorpar_rows(args.model, args.tp, config, args.new_tokens, args.repeats)
    if args.llama:
        from tensorpar.bench import llama_bin
        from tensorpar.bench.run import cores
        from tensorpar.loading import resolve_model

        bin_dir = llama_bin.find_bin_dir("llama-server")
        if bin_dir is None:
            raise SystemExit(llama_bin.absent_message("llama-server"))
        gguf = Path(resolve_model(args.model))
        if llama_bin.file_type(gguf) != args.llama_type:
            gguf = llama_bin.converted(llama_bin.find_bin_dir("llama-quantize"), gguf, args.llama_type,
                                       log=lambda m: print(m, flush=True))
        threads = args.llama_threads or cores()
        spec = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(lo), "--spec-ngram-simple-size-m",
                str(args.k)]
        result["llama.cpp"] = {"file": str(gguf), "threads": threads}
        for name, extra in (("off", []), ("ngram", spec)):
            print(f"llama-server {args.llama_type} t={threads} {' '.join(extra) or 'no speculation'}", flush=True)
            result["llama.cpp"][name] = llama_rows(gguf, bin_dir, threads, extra, args.new_tokens, args.repeats,
                                                   out / f"llama-server-{name}.log")
    lines = ["| engine | workload | ms/token, no speculation | ms/token, n-gram | ratio | acceptance | tokens equal |",
             "|---|---|---|---|---|---|---|"]
    for name in WORKLOADS:
        off, on = result["tensorpar"]["off"][name], result["tensorpar"]["ngram"][name]
        a, b = mean([r["ms_per_token"] for r in off]), mean([r["ms_per_token"] for r in on])
        drafted = sum(r["speculation"]["draft_tokens"] for r in on)
        taken = sum(r["speculation"]["accepted_tokens"] for r in on)
        equal = all(x["tokens"] == y["tokens"] for x, y in zip(off, on))
        lines.append(f"| tensorpar tp={args.tp} | {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x | "
                     f"{taken / drafted if drafted else 0:.0%} of {drafted} | {equal} |")
        if "llama.cpp" in result:
            off, on = result["llama.cpp"]["off"][name], result["llama.cpp"]["ngram"][name]
            a, b = mean([r["ms_per_token"] for r in off]), mean([r["ms_per_token"] for r in on])
            drafted = sum(r["draft_n"] for r in on)
            taken = sum(r["draft_n_accepted"] for r in on)
            lines.append(f"| llama.cpp {args.llama_type} t={result['llama.cpp']['threads']} | {name} | {a:.1f} | "
                         f"{b:.1f} | {b / a:.2f}x | {taken / drafted if drafted else 0:.0%} of {drafted} | "
                         f"{all(x['text'] == y['text'] for x, y in zip(off, on))} |")
    result["table"] = "\n".join(lines)
    (out / "speculative.json").write_text(json.dumps(result, indent=1))
    print(result["table"])
    print(f"wrote {out / 'speculative.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
