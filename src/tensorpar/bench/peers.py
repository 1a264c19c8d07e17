"""Peers measured in the same run, each in fresh processes with a timeout:

- ``transformers`` in one process (default threads, float32, same checkpoint);
- ``transformers`` with ``tp_plan="auto"`` under ``torchrun`` (gloo on CPU) at a TP degree. Where it
  fails (SmolLM2's 9 heads do not split over 2 ranks), the failure's one-line reason is the result;
- llama.cpp of 2025 (``llama-cpp-python``, where installed) on a GGUF model, batch 1, at each weight
  type matching a measured ``--quantization`` (``LLAMA_TYPES``) and thread count;
- the current llama.cpp build's own ``llama-bench`` (``make peers``, found by ``llama_bin``) on the
  same GGUF file, batch 1, at the file's own type, F32, and the types of a measured ``int8`` /
  ``int4``, at the thread count tensorpar's runs use.

The measuring itself is in ``hf_worker``, ``llama_cpp_worker`` and ``llama-bench``; this module
launches them and reads their answers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tensorpar.bench.hf_worker import ERROR, RESULT
from tensorpar.bench.processes import run_with_timeout


def parse_markers(text: str) -> tuple[dict | None, list[dict]]:
    """The worker's (last) result and error records found in ``text`` (lines of several ranks may
    run together, so markers are looked for anywhere)."""
    results, errors = _records(text, RESULT), _records(text, ERROR)
    return (results[-1] if results else None), errors


def _records(text: str, marker: str) -> list[dict]:
    decoder = json.JSONDecoder()
    found, start = [], 0
    while (i := text.find(marker, start)) >= 0:
        start = i + len(marker)
        try:
            found.append(decoder.raw_decode(text[start:].lstrip())[0])
        except json.JSONDecodeError:
            continue
    return found


def _last_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def _worker_args(model, batches, new_tokens, prompt_len, repeats) -> list[str]:
    return ["-m", "tensorpar.bench.hf_worker", "--model", str(model), "--batch", ",".join(map(str, batches)),
            "--new-tokens", str(new_tokens), "--prompt-len", str(prompt_len), "--repeats", str(repeats)]


def _outcome(name: str, tp: int, code, out: str, err: str, timeout_s: float) -> dict:
    result, errors = parse_markers(out)
    row = {"peer": name, "tp": tp}
    if code == 0 and result is not None:
        return {**row, "status": "ok", **result}
    if errors:
        first = next((e for e in errors if e.get("rank") == 0), errors[0])
        reason = first["reason"]
    elif code is None:
        reason = f"timed out after {timeout_s:.0f} s"
    else:
        reason = _last_error_line(err)
    return {**row, "status": "failed", "reason": reason}


def transformers_single(model, batches, new_tokens, prompt_len, repeats=2, timeout_s=600.0) -> dict:
    """transformers in one fresh process, default threads."""
    code, out, err = run_with_timeout([sys.executable, *_worker_args(model, batches, new_tokens, prompt_len, repeats)],
                                      timeout_s)
    return _outcome("transformers", 1, code, out, err, timeout_s)


def transformers_tp_plan(model, tp, batches, new_tokens, prompt_len, repeats=2, timeout_s=600.0) -> dict:
    """transformers with ``tp_plan="auto"`` on ``tp`` ranks started by ``torchrun --standalone``
    (gloo on CPU; torchrun sets OMP_NUM_THREADS=1 per rank unless it is set)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
           *_worker_args(model, batches, new_tokens, prompt_len, repeats), "--tp-plan"]
    code, out, err = run_with_timeout(cmd, timeout_s)
    return _outcome("transformers tp_plan=auto", tp, code, out, err, timeout_s)


LLAMA_CPP_PYTHON = "llama.cpp 2025 (llama-cpp-python)"

# llama.cpp's weight type beside each --quantization: the file's own blocks, float32 written by llama.cpp,
# and its 8- and 4-bit block types for our int8 / int4.
LLAMA_TYPES = {"gguf": "native", "none": "F32", "int8": "Q8_0", "int4": "Q4_0"}


def llama_cpp(model, quantizations: list[str], threads: list[int], new_tokens: int, prompt_len: int, vocab: int,
              repeats: int = 2, timeout_s: float = 600.0) -> list[dict]:
    """llama.cpp at batch 1 in one fresh process: a row per (weight type, thread count); one
    skipped row when the model is not a GGUF file or ``llama_cpp`` is not installed."""
    import importlib.util

    from tensorpar.loading import resolve_model

    path = resolve_model(model)
    row = {"peer": LLAMA_CPP_PYTHON, "tp": 1}
    if path.suffix != ".gguf":
        return [{**row, "status": "skipped", "reason": f"{path.name} is not a GGUF file"}]
    if importlib.util.find_spec("llama_cpp") is None:
        return [{**row, "status": "skipped", "reason": "llama-cpp-python is not installed (pip install 'tensorpar[llama-cpp]')"}]
    types = list(dict.fromkeys(LLAMA_TYPES[q] for q in quantizations if q in LLAMA_TYPES))
    cmd = [sys.executable, "-m", "tensorpar.bench.llama_cpp_worker", "--model", str(path), "--types", ",".join(types),
           "--threads", ",".join(map(str, threads)), "--new-tokens", str(new_tokens), "--prompt-len", str(prompt_len),
           "--repeats", str(repeats), "--vocab", str(vocab)]
    code, out, err = run_with_timeout(cmd, timeout_s)
    rows = [{**row, "status": "ok", **r} for r in _records(out, RESULT)]
    rows += [{**row, "status": "failed", **r} for r in _records(out, ERROR)]
    if not rows:
        reason = f"timed out after {timeout_s:.0f} s" if code is None else _last_error_line(err or f"exit code {code}")
        rows.append({**row, "status": "failed", "reason": reason})
    return rows


def llama_cpp_current(model, quantizations: list[str], threads: int, new_tokens: int, prompt_len: int,
                      repeats: int = 2, timeout_s: float = 600.0, log=None, env=None) -> list[dict]:
    """The current llama.cpp build's ``llama-bench`` at batch 1 on ``model``'s GGUF file: a row per
    weight type (``native``: the file's own; ``F32``; ``Q8_0`` / ``Q4_0`` where ``int8`` / ``int4``
    are measured), each from one ``llama-bench -p PROMPT_LEN -n NEW_TOKENS -t THREADS -r REPEATS``
    (a prefill and a decode test). Types other than the file's own are written once by
    ``llama-quantize`` (``llama_bin.converted``). One skipped row when the model is not a GGUF file
    or ``llama-bench`` is not found (its reason says how to get it)."""
    from tensorpar.bench import llama_bin
    from tensorpar.errors import one_line
    from tensorpar.loading import resolve_model

    path = Path(resolve_model(model))
    row = {"peer": llama_bin.LABEL, "tp": 1}
    if path.suffix != ".gguf":
        return [{**row, "status": "skipped", "reason": f"{path.name} is not a GGUF file"}]
    bin_dir = llama_bin.find_bin_dir("llama-bench", env)
    if bin_dir is None:
        return [{**row, "status": "skipped", "reason": llama_bin.absent_message("llama-bench", env)}]
    own = llama_bin.file_type(path)
    kinds = ["native", "F32"] + [LLAMA_TYPES[q] for q in quantizations if q in ("int8", "int4")]
    kinds = [k for k in dict.fromkeys(kinds) if k == "native" or k != own]  # an F32 file is its own F32 row
    rows = []
    for kind in kinds:
        r = {**row, "type": kind, "file_type": own if kind == "native" else kind, "threads": threads,
             "bin_dir": str(bin_dir)}
        try:
            file = path if kind == "native" else llama_bin.converted(bin_dir, path, kind, threads=threads,
                                                                     timeout_s=timeout_s, log=log)
            entries = llama_bin.run_llama_bench(bin_dir, file, threads, new_tokens, prompt_len, repeats, timeout_s)
            decode, prefill = llama_bin.decode_ms(entries), llama_bin.prefill_tokens_per_s(entries)
            if decode is None or prefill is None:
                raise RuntimeError("llama-bench's JSON lacks its decode or prefill test")
            rows.append({**r, "status": "ok", "file": str(file), "file_bytes": file.stat().st_size,
                         "build": llama_bin.build_of(entries), "repeats": repeats,
                         "decode_ms_per_token": {"1": decode["best"]},
                         "decode_ms_per_token_mean": {"1": decode["mean"]},
                         "prefill_tokens_per_s": prefill["best"], "prefill_tokens_per_s_mean": prefill["mean"],
                         "prefill_s": prompt_len / prefill["best"], "new_tokens": new_tokens, "prompt_len": prompt_len,
                         "command": llama_bin.bench_command(bin_dir, file, threads, new_tokens, prompt_len, repeats)})
        except Exception as e:  # noqa: BLE001 - the failure is the result
            rows.append({**r, "status": "failed", "reason": one_line(e, 300)})
    return rows
