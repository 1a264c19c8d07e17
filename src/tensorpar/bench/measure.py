"""tensorpar itself at one TP degree: decode ms/token per batch size, prefill tokens/s, peak RSS.

One ``LLM`` per degree (TP=1 runs in this process, TP>1 in spawned ranks), closed after use.
Prompts are token ids (``prompts.py``), identical to the peers'.

- decode: batch B = B prompts of 16 tokens, ``SamplingParams(max_new_tokens=N, ignore_eos=True)``,
  ``timings["decode_s_per_token"]`` (the mean of the N - 1 decode steps; each step makes one token
  for each of the B prompts), the best of ``repeats`` calls after a short warm-up call with the
  same prompts (best-of, as for the peers: a shared machine only ever makes a run slower);
- prefill: one ``prompt_len``-token prompt, ``max_new_tokens=1``, ``prompt_len / timings["prefill_s"]``,
  the best of ``repeats`` calls after one warm-up call;
- peak RSS per rank: ``GenerationResult.peak_rss_mb`` of the last call (VmHWM, a lifetime peak).
  At TP=1 it is this process's.
"""

from __future__ import annotations

import gc
import time

from tensorpar.bench.prompts import batch_prompts, fit_context, long_prompt
from tensorpar.errors import one_line


def measure_tensorpar(model: str, tp: int, batches: list[int], new_tokens: int, prompt_len: int,
                      repeats: int = 1, pp: int = 1) -> dict:
    """Measure one layout; a failure is recorded as the result (``status: failed``)."""
    from tensorpar import LLM, SamplingParams

    row: dict = {"tp": tp, "pp": pp}
    llm = None
    try:
        t0 = time.perf_counter()
        llm = LLM(model, tp=tp, pp=pp, progress=False)
        row["load_s"] = time.perf_counter() - t0
        row["backend"] = getattr(llm, "backend", None)
        vocab = llm.config.vocab_size
        prompt_len, new_tokens = fit_context(llm.config.max_position_embeddings, prompt_len, new_tokens)
        row.update(prompt_len=prompt_len, new_tokens=new_tokens)
        decode, tokens_per_s = {}, {}
        for b in batches:
            prompts = batch_prompts(vocab, b)
            llm.generate_full(prompts, SamplingParams(max_new_tokens=min(4, new_tokens), ignore_eos=True))  # warm-up
            sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            ms = min(llm.generate_full(prompts, sp).timings["decode_s_per_token"] for _ in range(repeats)) * 1e3
            decode[str(b)] = ms
            tokens_per_s[str(b)] = b * 1e3 / ms if ms > 0 else None
        one = SamplingParams(max_new_tokens=1, ignore_eos=True)
        prompt = long_prompt(vocab, prompt_len)
        llm.generate_full(prompt, one)  # warm-up
        runs = [llm.generate_full(prompt, one) for _ in range(repeats)]
        prefill_s = min(r.timings["prefill_s"] for r in runs)
        row.update(
            status="ok",
            repeats=repeats,
            decode_ms_per_token=decode,
            decode_tokens_per_s=tokens_per_s,
            prefill_s=prefill_s,
            prefill_tokens_per_s=prompt_len / prefill_s,
            peak_rss_mb=list(runs[-1].peak_rss_mb),
        )
    except Exception as e:  # noqa: BLE001 - one degree failing must not lose the others
        row.update(status="failed", reason=one_line(e))
    finally:
        if llm is not None:
            llm.close()
        del llm
        gc.collect()
    return row
