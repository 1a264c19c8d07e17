"""tensorpar: tensor parallelism for PyTorch transformer models.

The public names are imported on first use, so that torch-free parts (the planner, the CLI's
argument parsing) start in milliseconds.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "tensorpar.runtime",
    "SamplingParams": "tensorpar.runtime",
    "TensorparError": "tensorpar.errors",
    "CheckpointError": "tensorpar.errors",
    "RankFailure": "tensorpar.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tensorpar' has no attribute {name!r}")
