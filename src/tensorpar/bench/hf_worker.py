"""The Hugging Face ``transformers`` peer, run in a fresh process (or under ``torchrun`` with
``--tp-plan``) so that its memory and threads do not mix with the benchmark's own.

    python -m tensorpar.bench.hf_worker --model M --batch 1,8 --new-tokens 32 --prompt-len 512 [--tp-plan]

Prints one line ``TENSORPAR_BENCH_RESULT {json}`` (rank 0), or ``TENSORPAR_BENCH_ERROR {json}``
with a one-line reason and exits 1.

How it measures (float32, greedy, the same token-id prompts as tensorpar's):

- decode ms/token at batch B: ``model.generate`` with ``min_new_tokens = max_new_tokens = N``
  minus ``model.generate`` of one token, over the N - 1 decode steps in between (best of
  ``--repeats`` for each, after a warm-up call). This is ``generate`` as a user calls it, per-step
  overhead included, and matches tensorpar's ``decode_s_per_token`` (the first token belongs to
  prefill there too).
- prefill tokens/s: ``prompt_len`` / (time of ``generate`` of one token on the long prompt), best
  of ``--repeats`` after a warm-up.
- peak RSS: VmHWM of every process, at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from tensorpar.errors import one_line

RESULT, ERROR = "TENSORPAR_BENCH_RESULT", "TENSORPAR_BENCH_ERROR"


def load(model: str, tp_plan: bool):
    import torch
    from transformers import AutoModelForCausalLM

    from tensorpar.loading import resolve_model

    path = resolve_model(model)
    kw = {"dtype": torch.float32}
    if path.suffix == ".gguf":
        where, kw["gguf_file"] = path.parent, path.name
    else:
        where = path
    if tp_plan:
        kw["tp_plan"] = "auto"
    return AutoModelForCausalLM.from_pretrained(where, **kw).eval()


def _die_with_parent() -> None:
    """SIGKILL this process when its parent (the benchmark, or torchrun) dies."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tp-plan", action="store_true", help="tp_plan='auto' under torchrun")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    warnings.filterwarnings("ignore")
    stage = {"now": "loading"}
    try:
        out = run(args, stage)
    except BaseException as e:  # noqa: BLE001 - the failure is the result
        prefix = f"while {stage['now']}: "
        record = {"rank": rank, "stage": stage["now"], "reason": prefix + one_line(e, 300 - len(prefix))}
        print(f"{ERROR} {json.dumps(record)}", flush=True)
        return 1
    if rank == 0:
        print(f"{RESULT} {json.dumps(out)}", flush=True)
    return 0


def run(args, stage: dict) -> dict:
    import torch
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    from tensorpar.bench.prompts import batch_prompts, long_prompt
    from tensorpar.process import peak_rss_mb

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    model = load(args.model, args.tp_plan)
    load_s = time.perf_counter() - t0
    stage["now"] = "generating"
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    vocab = model.config.vocab_size
    pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    if isinstance(pad, (list, tuple)):
        pad = pad[0]

    def timed(ids: torch.Tensor, n: int) -> float:
        if distributed:
            dist.barrier()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad)
        elapsed = time.perf_counter() - t
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, expected {n}")
        return elapsed

    def best(ids, n):
        return min(timed(ids, n) for _ in range(args.repeats))

    n = args.new_tokens
    decode = {}
    for b in [int(x) for x in args.batch.split(",") if x]:
        ids = torch.tensor(batch_prompts(vocab, b))
        timed(ids, 2)  # warm-up
        one, full = best(ids, 1), best(ids, n)
        decode[str(b)] = max(full - one, 0.0) / (n - 1) * 1e3
    ids = torch.tensor([long_prompt(vocab, args.prompt_len)])
    timed(ids, 1)  # warm-up
    prefill_s = best(ids, 1)
    rss = peak_rss_mb()
    rss_all = [None] * world
    if distributed:
        dist.all_gather_object(rss_all, rss)
    else:
        rss_all = [rss]
    return {
        "tp": world,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "decode_ms_per_token": decode,
        "prefill_tokens_per_s": args.prompt_len / prefill_s,
        "prefill_s": prefill_s,
        "peak_rss_mb": rss_all,
        "method": "generate(N) - generate(1) over N-1 steps, best of %d" % args.repeats,
    }


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # Skip interpreter teardown (process-group destructors can stall after a failed collective).
    os._exit(code)
