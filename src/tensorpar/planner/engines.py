"""Engine profiles: the fixed costs an inference engine adds to the roofline, which do not shrink
with TP.

The same hardware runs the same model at different speeds under different engines, mostly by
costs no FLOP or byte count sees:

- ``step_overhead_us``: once per forward step (prefill or decode): scheduling, input
  preparation, sampling, returning tokens, launching the step's (graph of) kernels;
- ``layer_overhead_us``: once per decoder layer per step: kernel launches and the small
  elementwise kernels a fused engine avoids (``None``: the device's ``layer_overhead_us``);
- ``step_overhead_per_rank_us``: more per step for each rank beyond the first, in an engine
  whose driver process sends each step's inputs to every worker (vLLM);
- ``allreduce_latency_us``: the latency of the engine's own small-message all-reduce kernel
  (one-shot over NVLink peer memory; ``None``: NCCL, the link model of ``comm``) for messages of
  at most ``allreduce_max_bytes``;
- ``memory_efficiency``: the fraction of HBM bandwidth its weight-streaming kernels reach
  (``None``: the device's), and ``int8_weight_efficiency`` the further fraction with 8-bit weights
  (weight-only int8 kernels dequantize as they stream);
- ``gqa_kv_read_fraction``: how decode attention reads a KV head's cache for the ``G`` query
  heads of its group on one rank (``G = query heads / KV heads`` of the shard): ``max(1, f G)``
  times. ``f = 0`` (the default) is a kernel built for grouped-query attention, which reads each
  KV head once; a kernel that walks the cache once per query head reads it ``G`` times, less what
  the L2 cache catches, so ``f < 1``. TensorRT-LLM before its XQA kernel
  (``docs/source/blogs/XQA-kernel.md`` of NVIDIA/TensorRT-LLM) was such a kernel, which its
  v0.5/v0.6 tables show; ``gqa_kv_read_fraction_8bit`` is the fraction with an 8-bit (FP8/INT8)
  cache (``None``: the same). Profile ``trtllm-0.6`` (the constants of ``trtllm`` with its own
  fitted fractions, ``prefill_overhead_us`` and ``attention_memory_efficiency``) is used by the
  validation rows of those versions;
- ``prefill_overhead_us``: once per request (per batch prefilled together), on the first token:
  what a request costs before and after its forward steps (input copies and buffer setup,
  the context phase's own launches, returning the token). TensorRT-LLM v0.5's first-token
  latencies of 128-token prompts on FP8 H100s (GPT-J 6B: 7 ms) are milliseconds above their
  weights and FLOPs, while its 2048-token ones are not;
- ``attention_memory_efficiency``: the fraction of HBM bandwidth decode attention reaches reading
  the KV cache (``None``: ``memory_efficiency``), apart from the weights' matmuls;
- ``bandwidth_per_sm_GBps``: the most its memory-bound kernels stream per SM (``None``: no
  limit). By Little's law a kernel's bandwidth is the bytes it keeps in flight over the memory
  latency; the bytes in flight are set per SM by the kernel's registers and shared memory, so
  the same kernel on a part with the same SMs and faster memory (an H200 against an H100: 132
  SMs both, 4.8 against 3.35 TB/s) reaches no more than it did. The streaming efficiencies above
  are capped at ``bandwidth_per_sm_GBps x SMs / datasheet bandwidth``. TensorRT-LLM v0.5's H200
  launch rows are slower than its H100 rows scaled by bandwidth; fitted for ``trtllm-0.6`` only;
- ``gemm_half_rows``: the engine's own Hockney n_1/2 for matmuls (``None``: the device's
  ``gemm_half_rows``): an engine whose GEMM kernels need more rows to reach their rate makes
  short prompts slower than their FLOPs say. LMDeploy v0.1's TurboMind takes 22 ms to a first
  token of a 128-token prompt on an A100 against 11 ms for a 1-token prompt, while its 2048-token
  prompts run near the matmul rate.

Profiles (``tensorpar plan --engine``):

==========  =======  ========  ==========  =======  =========================================
engine      step us  layer us  all-reduce  memory   where the numbers come from
==========  =======  ========  ==========  =======  =========================================
tensorpar   630      device    NCCL        device   not measured on GPUs: vLLM's step cost (a
                     (30)                           Python scheduler too), eager kernels (the
                                                    device's per-layer figure), NCCL
vllm        630      67        34 us       device   fitted on vLLM rows; + 257 us per step for
                                                    each rank beyond the first
trtllm      1690     17        35 us       0.77     fitted on TensorRT-LLM (v0.5, v0.6, v0.7a) and
                                                    FasterTransformer rows (NIM's all fell in
                                                    the held-out set); 35 us is no faster than
                                                    NCCL within a node, so NCCL's time is used
gpt-fast    14       14        19 us       0.72     fitted on gpt-fast rows (int8 weights at
                                                    0.72 of that)
lmdeploy    1630     33        15 us       0.92     fitted on LMDeploy v0.1 (TurboMind) rows
                                                    on A100: + 4.36 ms per request, matmul
                                                    n_1/2 90 rows; the memory efficiency
                                                    sits at the fit's physical ceiling
fitted      0        device    NCCL        device   ``--calibrate``: the device's fitted
                                                    per-layer overhead and measured collectives
==========  =======  ========  ==========  =======  =========================================

"Fitted" means: the constants of each engine that its rows can tell apart, with the one
``low_precision_efficiency`` of the catalog, minimize the absolute log error over the *fitting*
rows of ``docs/planner-validation.md`` (``benchmarks/planner_validation.py --fit``, every engine
at once, 1.4 min); no held-out row enters a fit (the fourth round of issue 16 chose which
mechanisms to try by looking at held-out misses, as that page says). Rounded values are written
here, and ``lmdeploy`` keeps the values of the round that added it, which the refit moved by
under 4%;
``trtllm-0.6`` adds ``gqa_kv_read_fraction`` = 0.31 (16-bit cache) and 0.90 (8-bit),
``prefill_overhead_us`` = 2090, ``attention_memory_efficiency`` = 0.88 and
``bandwidth_per_sm_GBps`` = 25.6 (3.4 TB/s on 132 SMs: it binds on the H200, not the H100).
The tensorpar and fitted profiles are not fitted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MIB = float(1 << 20)


@dataclass(frozen=True)
class Engine:
    """Fixed costs of one inference engine (module docstring)."""

    name: str
    step_overhead_us: float
    layer_overhead_us: float | None
    allreduce_latency_us: float | None
    description: str
    memory_efficiency: float | None = None
    int8_weight_efficiency: float = 1.0
    step_overhead_per_rank_us: float = 0.0
    gqa_kv_read_fraction: float = 0.0
    gqa_kv_read_fraction_8bit: float | None = None
    allreduce_max_bytes: float = 8 * MIB
    prefill_overhead_us: float = 0.0
    attention_memory_efficiency: float | None = None
    gemm_half_rows: float | None = None
    bandwidth_per_sm_GBps: float | None = None

    def kv_reads(self, group: float, kv_dtype: str) -> float:
        """How many times decode attention reads each cached KV byte for a group of ``group``
        query heads per KV head: ``max(1, f G)``, ``f`` the fraction for the cache's dtype."""
        f = self.gqa_kv_read_fraction
        if kv_dtype in ("fp8", "int8") and self.gqa_kv_read_fraction_8bit is not None:
            f = self.gqa_kv_read_fraction_8bit
        return max(1.0, f * group)


ENGINES: dict[str, Engine] = {
    "tensorpar": Engine("tensorpar", 630.0, None, None,
                        "tensorpar's engine (GPU constants assumed: vLLM's step cost, eager per-layer cost, NCCL)"),
    "vllm": Engine("vllm", 630.0, 67.0, 34.0, "vLLM (fitted)", step_overhead_per_rank_us=257.0),
    "trtllm": Engine("trtllm", 1690.0, 17.0, 35.0, "TensorRT-LLM (fitted)", memory_efficiency=0.77),
    "gpt-fast": Engine("gpt-fast", 14.0, 14.0, 19.0, "gpt-fast (fitted)", memory_efficiency=0.72,
                       int8_weight_efficiency=0.72),
    "lmdeploy": Engine("lmdeploy", 1630.0, 33.0, 15.0, "LMDeploy TurboMind v0.1 (fitted)", memory_efficiency=0.92,
                       prefill_overhead_us=4360.0, gemm_half_rows=90.0),
    "fitted": Engine("fitted", 0.0, None, None, "the device as --calibrate fitted it"),
}
ENGINES["trtllm-0.6"] = replace(ENGINES["trtllm"], name="trtllm-0.6", gqa_kv_read_fraction=0.31,
                                gqa_kv_read_fraction_8bit=0.90, prefill_overhead_us=2090.0,
                                attention_memory_efficiency=0.88, bandwidth_per_sm_GBps=25.7,
                                description="TensorRT-LLM up to v0.6 (no XQA kernel; gptSessionBenchmark)")
ENGINE_NAMES = tuple(ENGINES)


def resolve_engine(name: str) -> Engine:
    key = name.strip().lower()
    if key not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
    return ENGINES[key]
