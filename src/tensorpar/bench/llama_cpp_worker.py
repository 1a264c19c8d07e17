"""The llama.cpp peer (``llama-cpp-python``, an optional extra), run in a fresh process on the same
GGUF file and the same token-id prompts as tensorpar, so that its threads and memory are its own.

    python -m tensorpar.bench.llama_cpp_worker --model FILE.gguf --types native,F32 --threads 1,2 \
        --new-tokens 32 --prompt-len 512

For each weight type and thread count, prints one line ``TENSORPAR_BENCH_RESULT {json}`` per run
(a failure is a ``TENSORPAR_BENCH_ERROR`` line with its reason). A type other than ``native`` (the
file as shipped) is written once by llama.cpp's own quantize API from the file (dequantized and
re-quantized by llama.cpp, ``allow_requantize``) into ``~/.cache/tensorpar/llama.cpp/``.

How it measures (batch 1, greedy, like tensorpar's bench):

- decode ms/token: after the 16-token prompt is evaluated, ``N - 1`` single-token ``eval`` calls,
  each followed by the argmax of its logits (llama.cpp's own loop: one graph per token), timed
  together; best of ``--repeats``, after a warm-up run.
- prefill tokens/s: ``prompt_len`` / the time to ``eval`` the long prompt (in ``n_batch`` = 512
  token batches), best of ``--repeats`` after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tensorpar.bench.hf_worker import ERROR, RESULT, _die_with_parent
from tensorpar.errors import one_line

TYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
         "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def converted(path: Path, kind: str, cache: Path) -> Path:
    """``path`` written as ``kind`` by llama.cpp's quantize API (kept in ``cache``)."""
    import llama_cpp

    out = cache / f"{path.stem}-{kind}.gguf"
    if out.exists() and out.stat().st_mtime >= path.stat().st_mtime:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, TYPES[kind])
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(path).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not write {path.name} as {kind}")
    tmp.replace(out)
    return out


def without_extra_buffers() -> None:
    """Load models without llama.cpp's extra CPU buffer types (its AMX repacking): on the AMX Xeons
    this project's machines run as KVM guests, ``ggml_backend_amx_mul_mat`` crashes in the first
    decode (a segmentation fault). The plain CPU kernels (AVX-512 / AVX2) run instead."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params


def measure(path: Path, threads: int, new_tokens: int, prompt_len: int, repeats: int, vocab: int) -> dict:
    import llama_cpp
    import numpy as np

    from tensorpar.bench.prompts import batch_prompts, long_prompt

    llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=prompt_len + new_tokens + 32,
                          n_batch=512, verbose=False)

    def decode() -> float:
        llm.reset()
        llm.eval(batch_prompts(vocab, 1)[0])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return (time.perf_counter() - t) / (new_tokens - 1)

    def prefill() -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(long_prompt(vocab, prompt_len))
        return time.perf_counter() - t

    decode(), prefill()  # warm-up
    ms = min(decode() for _ in range(repeats)) * 1e3
    prefill_s = min(prefill() for _ in range(repeats))
    return {"threads": threads, "decode_ms_per_token": {"1": ms}, "prefill_s": prefill_s,
            "prefill_tokens_per_s": prompt_len / prefill_s, "file_bytes": path.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a GGUF file")
    ap.add_argument("--types", default="native,F32", help=f"native and/or {', '.join(TYPES)}")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vocab", type=int, required=True, help="the model's vocabulary (the prompts' token ids)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "tensorpar" / "llama.cpp"))
    ap.add_argument("--extra-buffers", action="store_true", help="keep llama.cpp's extra buffer types (AMX)")
    args = ap.parse_args(argv)
    if not args.extra_buffers:
        without_extra_buffers()
    source = Path(args.model)
    code = 0
    for kind in [t for t in args.types.split(",") if t]:
        for threads in [int(t) for t in args.threads.split(",") if t]:
            row = {"type": kind, "threads": threads, "extra_buffers": args.extra_buffers}
            try:
                path = source if kind == "native" else converted(source, kind, Path(args.cache))
                row.update(measure(path, threads, args.new_tokens, args.prompt_len, args.repeats, args.vocab))
                print(f"{RESULT} {json.dumps(row)}", flush=True)
            except BaseException as e:  # noqa: BLE001 - the failure is the result
                print(f"{ERROR} {json.dumps({**row, 'reason': one_line(e, 300)})}", flush=True)
                code = 1
    return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
