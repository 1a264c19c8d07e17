"""``tensorpar bench``: decode latency, prefill throughput and memory at several TP degrees,
against Hugging Face ``transformers`` and llama.cpp peers, a weight-streaming roofline, and a
collective sweep.

Modules: ``run`` (orchestration), ``measure`` (tensorpar itself), ``peers`` and ``hf_worker``
(transformers in fresh processes), ``llama_cpp_worker`` (llama-cpp-python) and ``llama_bin`` (the
current llama.cpp build's llama-bench, llama-quantize and llama-server), ``roofline``,
``collectives_sweep``, ``prompts``, ``report`` (tables) and ``plots``.
"""

from tensorpar.bench.run import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
