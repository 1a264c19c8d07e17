"""Plain single-device model code; parallelism is applied afterwards by ``tensorpar.plans``
(which swaps in the sharded layers of ``tensorpar.layers``: a mixture of experts' placement over
ranks and its token dispatch are ``layers.experts``). Nothing here imports ``tensorpar.distributed``.

``ModelConfig`` is torch-free; the model classes import torch on first use.
"""

from __future__ import annotations

import importlib

from tensorpar.models.config import ModelConfig

_LAZY = {"AttentionBatch": "tensorpar.layers.attention", "KVCache": "tensorpar.runtime.kv_cache",
         "CausalLM": "tensorpar.models.blocks", "LlamaForCausalLM": "tensorpar.models.llama"}

__all__ = ["ModelConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tensorpar.models' has no attribute {name!r}")
