"""Inference runtime: one scheduler for ``LLM``, ``tensorpar generate`` and ``tensorpar serve``,
the model runner of each rank, the KV cache, sampling. Names are imported on first use (``LLM``
itself imports no torch until its ranks have been started)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "llm", "SamplingParams": "sampling", "Completion": "request", "Request": "request",
    "TokenEvent": "request", "EngineArgs": "spec", "EngineSpec": "spec", "GenerationResult": "request",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"tensorpar.runtime.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tensorpar.runtime' has no attribute {name!r}")
