"""Every checkpoint format (Hugging Face safetensors, GGUF, tensorpar training checkpoints, tensors
in memory) behind one ``CheckpointSource``, and the sharded loader that builds a model from one.

Names are imported on first use (``open`` itself is torch-free, for the command line)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ALIASES": "open", "DEFAULT_MODEL": "open", "open_source": "open", "resolve_model": "open",
    "CheckpointSource": "sources", "TensorSource": "memory_source",
    "ShardedCheckpointSource": "tensorpar_checkpoint", "find_checkpoint": "tensorpar_checkpoint",
    "build_model": "loader", "load_weights": "loader",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"tensorpar.loading.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'tensorpar.loading' has no attribute {name!r}")
