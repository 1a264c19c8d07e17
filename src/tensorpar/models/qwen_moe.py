"""Qwen2-MoE and Qwen3-MoE: the Qwen2 layer (Q/K/V biases) or the Qwen3 layer (per-head q/k
norms) with a mixture of experts for MLP (``blocks.MoE``). Qwen2-MoE adds a shared expert gated by
sigmoid(``shared_expert_gate``) and does not renormalise the top-k (``norm_topk_prob`` false);
Qwen3-MoE has no shared expert and renormalises. Layers listed in ``mlp_only_layers`` (or off
``decoder_sparse_step``) keep a dense MLP. Checkpoint names are the model's own; in llama.cpp's
``qwen3moe`` GGUF files the experts are stacked per layer (``gguf_tensor``)."""

from tensorpar.models.blocks import EXPERT_PLAN, MOE_PLAN, CausalLM
from tensorpar.models.llama import from_gguf_layout
from tensorpar.models.names import gguf_experts, gguf_from_hf, same_name

__all__ = ["EXPERT_PLAN", "MODEL", "PLAN", "from_gguf_layout", "gguf_tensor", "hf_tensor"]

MODEL = CausalLM
PLAN = MOE_PLAN
hf_tensor = same_name
gguf_tensor = gguf_experts(gguf_from_hf(hf_tensor))
