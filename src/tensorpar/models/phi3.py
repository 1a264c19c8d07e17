"""Phi-3: the Llama family's layer, stored with Q/K/V fused into ``qkv_proj`` [(h + 2 kv) d, hidden]
and gate/up into ``gate_up_proj`` [2 i, hidden] (gate first), and LongRoPE (``longrope``: short
and long per-frequency factors, cos and sin scaled by the attention factor).

Each rank reads only its heads' rows of the fused tensors: a model tensor (``q_proj``) is a run of
the stored one's rows (``hf_tensor``)."""

from __future__ import annotations

from tensorpar.models.llama import MODEL, PLAN
from tensorpar.models.names import TensorRef, fused_rows

__all__ = ["MODEL", "PLAN", "hf_tensor"]

_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def hf_tensor(name: str, config, stored=None) -> TensorRef:
    *module, part, param = name.split(".")
    module = ".".join(module)
    if part not in _FUSED:
        return TensorRef(name)
    d, h, kv, i = config.head_dim, config.num_heads, config.num_kv_heads, config.intermediate_size
    parts = ([("q_proj", h * d), ("k_proj", kv * d), ("v_proj", kv * d)] if _FUSED[part] == "qkv_proj"
             else [("gate_proj", i), ("up_proj", i)])
    return TensorRef(f"{module}.{_FUSED[part]}.{param}", fused_rows(parts, part))
