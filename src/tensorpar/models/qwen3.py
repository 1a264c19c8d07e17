"""Qwen3 (dense): the Llama family's layer with per-head RMSNorm of q and k before RoPE
(``q_norm``, ``k_norm``), a ``head_dim`` of its own (not hidden / heads), no Q/K/V biases.
``ModelConfig`` sets ``qk_norm``; the blocks, plan and names are the Llama family's (q/k norms
act within one head, so they are replicated)."""

from tensorpar.models.llama import MODEL, PLAN, from_gguf_layout, gguf_tensor, hf_tensor

__all__ = ["MODEL", "PLAN", "from_gguf_layout", "gguf_tensor", "hf_tensor"]
