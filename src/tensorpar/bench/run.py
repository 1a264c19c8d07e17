"""``tensorpar bench`` end to end: tensorpar at each TP degree, the peers, the roofline and the
collective sweep, in one run on one machine; then tables, ``bench.json`` and plots.

Order matters for memory figures: tensorpar runs first (TP=1 runs in this process, whose peak RSS
is then the figure), and everything else runs in fresh processes.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

QUICK = dict(new_tokens=4, prompt_len=64, sweep_max_bytes=64 << 10, sweep_iters=2, sweep_warmup=1,
             repeats=1, bandwidth_repeats=3, timeout_s=180.0)


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    tp: list[int] = field(default_factory=lambda: [1, 2, 3])
    pp: int = 1  # pipeline stages of each measured TP degree (tp x pp ranks)
    dp: int = 1  # serving replicas of each layout (measured through the serving engines)
    ep: int = 1  # expert sets of a mixture of experts over each layout's ranks
    moe_dispatch: list[str] = field(default_factory=lambda: ["auto"])  # each measured in turn (a mixture of experts)
    quantization: list[str] = field(default_factory=lambda: ["none"])  # each measured in turn
    quant_group: int = 32
    deterministic: bool = False  # every layout in deterministic mode (``layers.deterministic``)
    speculative_config: str | None = None  # every layout with speculative decoding (``runtime.speculative``)
    batch: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 512
    new_tokens: int = 32
    out: str = "bench-out"
    peers: bool = True
    sweep: bool = True
    sweep_max_bytes: int = 64 << 20
    sweep_iters: int = 50  # timed calls per size (fewer for large messages)
    sweep_warmup: int = 5
    repeats: int = 2  # each timed run is the best of this many, tensorpar and peers alike
    bandwidth_mb: int = 256
    bandwidth_repeats: int = 7
    timeout_s: float = 600.0  # per subprocess / spawned group
    quick: bool = False
    command: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.tp or min(self.tp) < 1:
            raise ValueError(f"--tp needs degrees >= 1, got {self.tp}")
        if not isinstance(self.pp, int) or self.pp < 1:
            raise ValueError(f"--pp must be a positive integer, got {self.pp!r}")
        if not isinstance(self.ep, int) or self.ep < 1:
            raise ValueError(f"--ep must be a positive integer, got {self.ep!r}")
        from tensorpar.runtime.spec import MOE_DISPATCHES

        bad = [d for d in self.moe_dispatch if d not in MOE_DISPATCHES]
        if bad or not self.moe_dispatch:
            raise ValueError(f"--moe-dispatch takes {', '.join(MOE_DISPATCHES)}, got {', '.join(bad) or 'nothing'}")
        from tensorpar.layers.quant import QUANTIZATIONS

        if self.deterministic and self.dp > 1:
            raise ValueError("--deterministic is measured with --dp 1 (one replica of each layout)")
        if self.speculative_config is not None and self.dp > 1:
            raise ValueError("--speculative-config is measured with --dp 1 (one replica of each layout)")
        bad = [q for q in self.quantization if q not in QUANTIZATIONS]
        if bad or not self.quantization:
            raise ValueError(f"--quantization takes {', '.join(QUANTIZATIONS)}, got {', '.join(bad) or 'nothing'}")
        if not isinstance(self.dp, int) or self.dp < 1:
            raise ValueError(f"--dp must be a positive integer, got {self.dp!r}")
        if not self.batch or min(self.batch) < 1:
            raise ValueError(f"--batch needs sizes >= 1, got {self.batch}")
        if self.new_tokens < 2:
            raise ValueError("--new-tokens must be at least 2 (decode is timed over steps after the first token)")
        if self.prompt_len < 1:
            raise ValueError("--prompt-len must be positive")
        if self.sweep_max_bytes < 4:
            raise ValueError("--sweep-max-bytes must be at least 4")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = next((int(ln.split()[1]) // 1024 for ln in f if ln.startswith("MemTotal")), None)
    except OSError:
        pass
    info = {"cpu_model": cpu, "cores": cores(), "cpu_count": os.cpu_count(), "memory_mib": mem,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    from tensorpar import __version__

    info["tensorpar"] = __version__
    return info


def _log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run_bench(cfg: BenchConfig) -> dict:
    """Measure everything, write ``bench.json`` and the plots under ``cfg.out``; return the result."""
    from tensorpar.bench import collectives_sweep, peers, plots, roofline
    from tensorpar.bench.measure import measure_replicas, measure_tensorpar
    from tensorpar.bench.prompts import SHORT_PROMPT_TOKENS, fit_context
    from tensorpar.errors import one_line
    from tensorpar.loading import open_source

    config = open_source(cfg.model).config  # a wrong path or an unsupported model fails here, before anything runs
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    machine = machine_info()

    # tensorpar first: TP=1 runs in this process, whose peak RSS is then its figure.
    tensorpar_rows = []
    dispatches = cfg.moe_dispatch if config.num_experts else ["auto"]
    for tp in cfg.tp:
        for dispatch in dispatches:
            for quant in cfg.quantization:
                layout = (f"tp={tp}" + (f" pp={cfg.pp}" if cfg.pp > 1 else "") + (f" dp={cfg.dp}" if cfg.dp > 1 else "")
                          + (f" ep={cfg.ep}" if cfg.ep > 1 else "") + (f" {dispatch}" if len(dispatches) > 1 else "")
                          + (f" {quant}" if quant != "none" else ""))
                _log(f"tensorpar {layout}")
                if cfg.dp > 1:
                    row = measure_replicas(cfg.model, tp, cfg.pp, cfg.dp, cfg.batch, cfg.new_tokens, cfg.prompt_len,
                                           cfg.repeats)
                else:
                    row = measure_tensorpar(cfg.model, tp, cfg.batch, cfg.new_tokens, cfg.prompt_len, cfg.repeats,
                                            pp=cfg.pp, ep=cfg.ep, moe_dispatch=dispatch, quantization=quant,
                                            quant_group=cfg.quant_group, deterministic=cfg.deterministic,
                                            speculative_config=cfg.speculative_config)
                if row["status"] != "ok":
                    _log(f"tensorpar {layout} failed: {row['reason']}")
                tensorpar_rows.append(row)

    prompt_len, new_tokens = fit_context(config.max_position_embeddings, cfg.prompt_len, cfg.new_tokens)
    if (prompt_len, new_tokens) != (cfg.prompt_len, cfg.new_tokens):
        _log(f"cut to the model's context of {config.max_position_embeddings}: prompt length {prompt_len}, "
             f"new tokens {new_tokens}")
    settings = {**{k: v for k, v in asdict(cfg).items() if k != "command"}, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "short_prompt_tokens": SHORT_PROMPT_TOKENS, "dtype": "float32"}

    roof = None  # the roofline is drawn per TP degree: not with --pp, --dp or --ep
    if cfg.pp == 1 and cfg.dp == 1 and cfg.ep == 1:
        _log("memory bandwidth")
        try:
            bw1 = roofline.measure_in_subprocess(cfg.bandwidth_mb, cfg.bandwidth_repeats, 1, cfg.timeout_s)
            bw_all = (roofline.measure_in_subprocess(cfg.bandwidth_mb, cfg.bandwidth_repeats, cores(), cfg.timeout_s)
                      if cores() > 1 else None)
            wbytes = roofline.weight_bytes(config)
            b1 = {r["tp"]: (r["decode_ms_per_token"].get("1") if r["status"] == "ok" else None) for r in tensorpar_rows
                  if r.get("quantization", "none") == "none"}
            roof = {"weight_bytes": wbytes, "bandwidth_1_thread": bw1, "bandwidth_all_cores": bw_all,
                    **roofline.roofline(wbytes, bw1["read_GBps"], cores(), b1),
                    "note": "roofline = weight bytes one token reads (an MoE layer: its top-k experts) / 1-thread read "
                            "bandwidth; TP>1 divided by min(tp, cores)"}
        except Exception as e:  # noqa: BLE001
            _log(f"bandwidth test failed: {one_line(e)}")
            roof = {"status": "failed", "reason": one_line(e)}

    peer_result = None
    if cfg.peers:
        _log("peer: transformers, one process")
        single = peers.transformers_single(cfg.model, cfg.batch, new_tokens, prompt_len, cfg.repeats, cfg.timeout_s)
        tp_plan = []
        for tp in [t for t in cfg.tp if t > 1]:
            _log(f"peer: transformers tp_plan=auto, {tp} ranks (torchrun)")
            tp_plan.append(peers.transformers_tp_plan(cfg.model, tp, cfg.batch, new_tokens, prompt_len,
                                                      cfg.repeats, cfg.timeout_s))
        threads = sorted({1, cores()})
        _log(f"peer: {peers.LLAMA_CPP_PYTHON}, {'/'.join(map(str, threads))} threads")
        llama = peers.llama_cpp(cfg.model, cfg.quantization, threads, new_tokens, prompt_len, config.vocab_size,
                                cfg.repeats, cfg.timeout_s)
        _log(f"peer: llama.cpp (current build), llama-bench, {cores()} threads")
        current = peers.llama_cpp_current(cfg.model, cfg.quantization, cores(), new_tokens, prompt_len, cfg.repeats,
                                          cfg.timeout_s, log=_log)
        for r in current:  # an absent llama-bench: one line saying how to get it
            if r["status"] != "ok":
                _log(r["reason"] if r["reason"].startswith(r["peer"]) else
                     f"{r['peer']}{' ' + r['type'] if 'type' in r else ''} {r['status']}: {r['reason']}")
        peer_result = {"transformers": single, "transformers_tp_plan": tp_plan, "llama_cpp": llama,
                       "llama_cpp_current": current}

    coll_rows, coll_failures = None, []
    if cfg.sweep:
        coll_rows = []
        sizes = collectives_sweep.sweep_sizes(cfg.sweep_max_bytes)
        for n in sorted({2, *[t for t in cfg.tp if t > 1]}):
            _log(f"collective sweep, {n} ranks, {sizes[0]} B to {sizes[-1]} B")
            try:
                coll_rows += collectives_sweep.run_sweep(n, sizes, cfg.sweep_iters, cfg.sweep_warmup, cfg.timeout_s)
            except Exception as e:  # noqa: BLE001
                _log(f"collective sweep at {n} ranks failed: {one_line(e)}")
                coll_failures.append({"world_size": n, "reason": one_line(e)})

    result = {
        "benchmark": "tensorpar bench",
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.datetime.now().astimezone() - started).total_seconds(), 1),
        "command": shlex.join(cfg.command) if cfg.command else None,
        "argv": cfg.command,
        "machine": machine,
        "settings": settings,
        "methods": METHODS,
        "tensorpar": tensorpar_rows,
        "peers": peer_result,
        "roofline": roof if roof and "status" not in roof else None,
        "roofline_failure": roof if roof and "status" in roof else None,
        "collectives": coll_rows,
        "collective_failures": coll_failures,
    }
    result["plots"] = [str(p) for p in plots.write_plots(result, out_dir)]
    path = out_dir / "bench.json"
    result["json"] = str(path)
    path.write_text(json.dumps(result, indent=2))
    return result


METHODS = {
    "tensorpar_decode": "LLM.generate_full on B prompts of 16 token ids, SamplingParams(max_new_tokens=N, "
                        "ignore_eos=True); timings['decode_s_per_token'] (mean over the N-1 decode steps, each "
                        "making one token per prompt), best of `repeats` calls after a warm-up call with the same prompts",
    "tensorpar_prefill": "prompt_len / timings['prefill_s'] for one prompt_len-token prompt with max_new_tokens=1, "
                         "best of `repeats` calls after one warm-up call",
    "tensorpar_replicas": "with --dp: the same prompts as requests to the serving replicas (least outstanding "
                          "first); decode = mean over requests of (last token time - first) / (N-1), prefill = "
                          "time to the first token of the long prompt; best of `repeats` after a warm-up",
    "peak_rss": "VmHWM of each rank at the end (tensorpar TP=1: the benchmark process itself)",
    "transformers_decode": "(time of generate with min_new_tokens=max_new_tokens=N - time of generate with 1 "
                           "token) / (N-1), greedy, best of `repeats` each, after a warm-up",
    "llama_cpp_current": "the current llama.cpp build's llama-bench (make peers) on the same GGUF file, batch 1, "
                         "at the thread count of tensorpar's runs (the machine's cores): llama-bench -p prompt_len "
                         "-n N -t threads -r repeats -o json, its prefill and decode tests each repeated after a "
                         "warm-up; decode ms/token = 1000 / the fastest repetition's tokens/s (the mean, 1000 / "
                         "avg_ts, beside it), prefill likewise; weight types: the file's own (native), F32, and "
                         "Q8_0 / Q4_0 for int8 / int4, written once by llama-quantize --allow-requantize",
    "llama_cpp": "llama-cpp-python (llama.cpp of 2025) on the same GGUF file, batch 1, in a fresh process: "
                 "after the 16-token prompt, "
                 "N-1 single-token eval calls with an argmax each, timed together; prefill = prompt_len / eval of "
                 "the long prompt; best of `repeats` after a warm-up; weight type per --quantization "
                 "(gguf: the file's own, none: F32, int8: Q8_0, int4: Q4_0, written by llama.cpp's quantize API)",
    "transformers_prefill": "prompt_len / time of generate(max_new_tokens=1) on the long prompt, best of "
                            "`repeats` after a warm-up",
    "bandwidth": "fresh process, torch.set_num_threads(threads), 256 MB float32: read = a.sum(), "
                 "copy = b.copy_(a) counting read + write bytes; best of several",
    "collectives": "nccl-tests conventions: all-gather size = gathered output; median of back-to-back calls "
                   "after warm-up, slowest rank; busbw = algbw * 2(n-1)/n (all-reduce), (n-1)/n (all-gather)",
}
