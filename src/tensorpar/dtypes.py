"""One vocabulary of dtype names for every command and API.

Every dtype has a short name and is accepted under each of its aliases, on every command:

    fp32  float32  f32        bf16  bfloat16        fp16  float16  f16  half
    fp8   float8              int8

Engines (``generate``, ``serve``, ``LLM``) load weights as fp32, bf16 or fp16, and also take
``auto``: bf16 on CUDA, fp32 elsewhere. The planner also plans fp8 and int8 weights. Reports name
engine dtypes by their torch names (``float32``). Torch is imported only by ``torch_dtype``.
"""

from __future__ import annotations

ALIASES: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32", "float32", "f32"),
    "bf16": ("bf16", "bfloat16"),
    "fp16": ("fp16", "float16", "f16", "half"),
    "fp8": ("fp8", "float8"),
    "int8": ("int8",),
}
SHORT = {alias: short for short, names in ALIASES.items() for alias in names}
ENGINE_DTYPES = ("fp32", "bf16", "fp16")
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def short_name(name: str, allowed: tuple[str, ...] = tuple(ALIASES), what: str = "dtype") -> str:
    """The short name of ``name`` (any alias, any case); ``ValueError`` listing the choices otherwise."""
    short = SHORT.get(str(name).strip().lower())
    if short is None or short not in allowed:
        choices = ", ".join(f"{s} ({'/'.join(ALIASES[s][1:])})" if len(ALIASES[s]) > 1 else s for s in allowed)
        raise ValueError(f"unknown {what} {name!r}; choose one of: {choices}")
    return short


def engine_dtype(name: str, device: str = "cpu") -> str:
    """The short name of the dtype an engine loads weights as; ``auto``: bf16 on CUDA, fp32 elsewhere."""
    if str(name).strip().lower() == "auto":
        return "bf16" if str(device).startswith("cuda") else "fp32"
    try:
        return short_name(name, ENGINE_DTYPES)
    except ValueError as e:
        raise ValueError(f"{e}, or auto (bf16 on CUDA, fp32 elsewhere)") from None


def torch_name(short: str) -> str:
    """``fp32`` -> ``float32``: the name torch and reports use."""
    return TORCH_NAMES[short]


def torch_dtype(short: str):
    """The ``torch.dtype`` of an engine dtype's short name."""
    import torch

    return getattr(torch, TORCH_NAMES[short])
