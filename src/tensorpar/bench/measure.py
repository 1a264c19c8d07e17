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

With ``dp`` replicas (``measure_replicas``) the same prompts go to the serving replicas of
``tensorpar serve --dp`` (no HTTP), each to the least busy: decode ms/token is the mean, over the
B requests, of (last token's time - first token's) / (N - 1), and tok/s is B / that; prefill is
one prompt's time to its first token. Peak RSS is not reported (the replicas' ranks are not asked).
"""

from __future__ import annotations

import gc
import os
import threading
import time

from tensorpar.bench.prompts import batch_prompts, fit_context, long_prompt
from tensorpar.errors import one_line


def measure_tensorpar(model: str, tp: int, batches: list[int], new_tokens: int, prompt_len: int,
                      repeats: int = 1, pp: int = 1, ep: int = 1, moe_dispatch: str = "auto",
                      quantization: str = "none", quant_group: int = 32, deterministic: bool = False,
                      speculative_config: str | None = None) -> dict:
    """Measure one layout; a failure is recorded as the result (``status: failed``). A mixture of
    experts' row carries ``experts``: the expert load (``ModelRunner.expert_load``) of the last
    timed call of each phase ("decode b=B", "prefill"); with speculative decoding, ``speculation``
    is each batch size's acceptance (``speculative.speculation_summary``, last timed call)."""
    from tensorpar import LLM, SamplingParams

    row: dict = {"tp": tp, "pp": pp, "ep": ep}
    llm = None
    try:
        t0 = time.perf_counter()
        llm = LLM(model, tp=tp, pp=pp, ep=ep, moe_dispatch=moe_dispatch, quantization=quantization,
                  quant_group=quant_group, progress=False, prefix_caching=False,  # (repeats compute every prompt)
                  deterministic=deterministic, speculative_config=speculative_config)
        if deterministic:
            row["deterministic"] = True
        if llm.spec.speculative is not None:
            row["speculative"] = llm.spec.speculative.describe()
        if quantization != "none":
            row["quantization"] = quantization + (f" g{quant_group}" if quantization == "int4" else "")
        if llm.config.num_experts:
            row["moe_dispatch"] = moe_dispatch
        row["load_s"] = time.perf_counter() - t0
        row["backend"] = getattr(llm, "backend", None)
        vocab = llm.config.vocab_size
        prompt_len, new_tokens = fit_context(llm.config.max_position_embeddings, prompt_len, new_tokens)
        row.update(prompt_len=prompt_len, new_tokens=new_tokens)
        decode, tokens_per_s, experts, speculation = {}, {}, {}, {}
        for b in batches:
            prompts = batch_prompts(vocab, b)
            llm.generate_full(prompts, SamplingParams(max_new_tokens=min(4, new_tokens), ignore_eos=True))  # warm-up
            sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            timed = [llm.generate_full(prompts, sp) for _ in range(repeats)]
            ms = min(r.timings["decode_s_per_token"] for r in timed) * 1e3
            decode[str(b)] = ms
            tokens_per_s[str(b)] = b * 1e3 / ms if ms > 0 else None
            if timed[-1].experts:
                experts[f"decode b={b}"] = timed[-1].experts
            if timed[-1].speculation:
                speculation[str(b)] = timed[-1].speculation
        one = SamplingParams(max_new_tokens=1, ignore_eos=True)
        prompt = long_prompt(vocab, prompt_len)
        llm.generate_full(prompt, one)  # warm-up
        runs = [llm.generate_full(prompt, one) for _ in range(repeats)]
        prefill_s = min(r.timings["prefill_s"] for r in runs)
        if runs[-1].experts:
            experts["prefill"] = runs[-1].experts
        if experts:
            row["experts"] = experts
        if speculation:
            row["speculation"] = speculation
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


def _timed_requests(backend, prompts: list[list[int]], new_tokens: int) -> list[list[float]]:
    """Submit one request per prompt at once; each one's token times (seconds, perf_counter)."""
    from tensorpar.runtime.request import Request
    from tensorpar.runtime.sampling import SamplingParams

    stamps: list[list[float]] = [[] for _ in prompts]
    done = threading.Semaphore(0)
    errors: list[str] = []

    def sink_for(i: int):
        def sink(event) -> None:
            if event.token_id is not None:
                stamps[i].append(time.perf_counter())
            if event.finished:
                if event.finish_reason == "error":
                    errors.append(event.error or "error")
                done.release()
        return sink

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    tag = f"bench-{time.monotonic_ns()}"
    for i, p in enumerate(prompts):
        backend.submit(Request(f"{tag}-{i}", list(p), params), sink_for(i))
    for _ in prompts:
        done.acquire()
    if errors:
        raise RuntimeError(errors[0])
    return stamps


def measure_replicas(model: str, tp: int, pp: int, dp: int, batches: list[int], new_tokens: int, prompt_len: int,
                     repeats: int = 1) -> dict:
    """Measure ``dp`` serving replicas of tp x pp (see the module's docstring); a failure is the result."""
    import torch

    from tensorpar.runtime.replicas import start_serving
    from tensorpar.runtime.spec import EngineArgs

    row: dict = {"tp": tp, "pp": pp, "dp": dp}
    backend = None
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = torch.get_num_threads()
    try:
        t0 = time.perf_counter()
        spec = EngineArgs(model, tp=tp, pp=pp, dp=dp, progress=False, prefix_caching=False).resolve()
        backend = start_serving(spec, max(max(batches), 1))
        row["load_s"] = time.perf_counter() - t0
        config = spec.config
        prompt_len, new_tokens = fit_context(config.max_position_embeddings, prompt_len, new_tokens)
        row.update(prompt_len=prompt_len, new_tokens=new_tokens, backend=f"{dp} replicas")
        decode, tokens_per_s = {}, {}
        for b in batches:
            prompts = batch_prompts(config.vocab_size, b)
            _timed_requests(backend, prompts, min(4, new_tokens))  # warm-up
            best = None
            for _ in range(repeats):
                stamps = _timed_requests(backend, prompts, new_tokens)
                ms = 1e3 * sum((s[-1] - s[0]) / (len(s) - 1) for s in stamps) / len(stamps)
                best = ms if best is None else min(best, ms)
            decode[str(b)] = best
            tokens_per_s[str(b)] = b * 1e3 / best if best > 0 else None
        prompt = long_prompt(config.vocab_size, prompt_len)
        _timed_requests(backend, [prompt], 1)  # warm-up
        prefill_s = None
        for _ in range(repeats):
            t = time.perf_counter()
            (stamps,) = _timed_requests(backend, [prompt], 1)
            prefill_s = min(prefill_s or 1e9, stamps[0] - t)
        row.update(status="ok", repeats=repeats, decode_ms_per_token=decode, decode_tokens_per_s=tokens_per_s,
                   prefill_s=prefill_s, prefill_tokens_per_s=prompt_len / prefill_s, peak_rss_mb=[])
    except Exception as e:  # noqa: BLE001 - one layout failing must not lose the others
        row.update(status="failed", reason=one_line(e))
    finally:
        if backend is not None:
            backend.shutdown()
        if affinity is not None:  # replica 0's rank ran in this process, pinned to its cores
            os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)
        gc.collect()
    return row
