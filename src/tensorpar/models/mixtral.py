"""Mixtral: the Llama layer with a mixture of experts for MLP (``blocks.MoE``: softmax router,
top-k renormalised), stored under ``block_sparse_moe`` with each expert's ``w1`` (gate), ``w3``
(up) and ``w2`` (down); ``hf_tensor`` maps the model's Llama-style names onto those. llama.cpp
writes Mixtral as a ``llama`` GGUF file with ``expert_count``, its experts stacked per layer
(``gguf_tensor``) and Q/K permuted as for Llama (``from_gguf_layout``)."""

from __future__ import annotations

import re

from tensorpar.models.blocks import EXPERT_PLAN, MOE_PLAN, CausalLM
from tensorpar.models.llama import from_gguf_layout
from tensorpar.models.names import TensorRef, gguf_experts, gguf_from_hf

__all__ = ["EXPERT_PLAN", "MODEL", "PLAN", "from_gguf_layout", "gguf_tensor", "hf_tensor"]

MODEL = CausalLM
PLAN = MOE_PLAN
_EXPERT_PARTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_MOE = re.compile(r"^(model\.layers\.\d+\.)mlp\.(gate|experts\.\d+\.(gate_proj|up_proj|down_proj))\.")


def hf_tensor(name: str, config, stored=None) -> TensorRef:
    m = _MOE.match(name)
    if m is None:
        return TensorRef(name)
    inner = m.group(2) if m.group(3) is None else m.group(2).replace(m.group(3), _EXPERT_PARTS[m.group(3)])
    return TensorRef(f"{m.group(1)}block_sparse_moe.{inner}.{name[m.end():]}")


gguf_tensor = gguf_experts(gguf_from_hf(hf_tensor))
