"""Refuse a load that cannot fit, before any rank reads a weight.

A rank holds its shard of the weights: on the busiest rank of the busiest pipeline stage
(``planner.memory.stage_weight_params``, padded head slots included) ``params x bytes`` with
``bytes`` the element size of the dtype; with ``int8`` / ``int4`` the layers' matrices take 1 /
0.5 byte per weight (plus a 2-byte scale and zero per group of ``int4``) while the embedding and
LM head stay in the dtype; with ``gguf`` every parameter takes the file's mean bytes per
parameter. The ranks on this host
hold ``ranks x that`` at most. The load is refused when one rank's share exceeds ``--max-memory``,
or when this host's ranks together would need more than the memory the system reports available
(CPU ranks; a CUDA rank's weights live on its device).
"""

from __future__ import annotations

import re

from tensorpar.errors import TensorparError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"8GiB"``, ``"500MB"``, ``"1e9"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"not a size: {text!r} (give bytes, or a number with KB, MB, GB, KiB, MiB or GiB)")
    try:
        value = float(m.group(1)) * UNITS[m.group(2).lower()]
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
    if value <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return int(value)


def parse_budget(text: str) -> float | int:
    """``--kv-cache-memory``: a fraction of the memory free after loading (``"0.5"``), or bytes
    (``"4GiB"``, ``"2000000000"``)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and 0 < value <= 1:
        return value
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(f"not a KV budget: {text!r} (give a fraction of the free memory in (0, 1], or bytes, "
                         "or a number with KB, MB, GB, KiB, MiB or GiB)") from None


def kv_cache_bytes(budget: float | int, ranks_here: int, device: str) -> int:
    """Bytes of KV cache one rank may take: ``budget`` bytes, or that fraction of the memory free
    now (the device's, on CUDA; on CPUs the host's available memory shared by its ranks)."""
    if isinstance(budget, int):
        return budget
    if device.startswith("cuda"):
        import torch

        free = torch.cuda.mem_get_info()[0]
    else:
        import psutil

        free = psutil.virtual_memory().available / ranks_here
    return int(budget * free)


def show(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def weight_bytes_per_rank(source, dims, dtype_bytes: int, quantization: str, quant_group: int) -> float:
    """Bytes of weights the busiest rank holds (module docstring)."""
    from tensorpar.planner.arch import from_model_config
    from tensorpar.planner.costs import busiest_shard
    from tensorpar.planner.memory import stage_weight_params

    arch = from_model_config(source.config)
    try:
        shard = busiest_shard(arch, dims.width, dims.ep)
        params, vocab_rows = max(stage_weight_params(arch, shard, dims.pp)), shard.vocab
    except ValueError:  # experts in uneven sets, which the planner does not model: an even share
        params, vocab_rows = arch.total_params() / (dims.width * dims.pp), arch.vocab / dims.width
    if quantization == "gguf":
        return params * source.path.stat().st_size / max(arch.total_params(), 1)
    if quantization == "none":
        return params * dtype_bytes
    vocab = min(params, vocab_rows * arch.hidden * (1 if arch.tied_embeddings else 2))  # kept in the dtype
    return vocab * dtype_bytes + (params - vocab) * (1.0 if quantization == "int8" else 0.5 + 4 / quant_group)


def check_fits(per_rank: float, ranks_here: int, layout: str, max_memory: int | None, on_cpu: bool) -> None:
    if max_memory is not None and per_rank > max_memory:
        raise TensorparError(f"out of memory before loading: at {layout} a rank needs about {show(per_rank)} for its "
                             f"weights, more than --max-memory {show(max_memory)} (more ranks or --quantization "
                             "int8/int4 need less per rank)")
    if on_cpu:
        import psutil

        available = psutil.virtual_memory().available
        if per_rank * ranks_here > available:
            raise TensorparError(f"out of memory before loading: {ranks_here} rank(s) on this host at {layout} need "
                                 f"about {show(per_rank * ranks_here)} for their weights, but only {show(available)} "
                                 "of memory is available (--quantization int8/int4 needs less; more ranks do not)")
