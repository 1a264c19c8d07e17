"""The Llama family (Llama 2/3.x, Mistral, Qwen2, SmolLM): the architecture module.

RMSNorm, SwiGLU MLP, grouped-query attention with rotary positions (Llama 3's ``llama3`` and
linear scaling, llama.cpp's ``rope_freqs`` factors), optional Q/K/V biases (Qwen2) and a sliding
window (Mistral). The model is ``tensorpar.models.blocks.CausalLM``; its checkpoint names are
Hugging Face's own. llama.cpp's converter permutes the rows of Q and K of ``llama`` GGUF files,
which ``from_gguf_layout`` undoes.
"""

from __future__ import annotations

import torch

from tensorpar.models.blocks import PLAN, CausalLM, DecoderLayer, RMSNorm
from tensorpar.models.config import ModelConfig
from tensorpar.models.names import gguf_from_hf, same_name
from tensorpar.models.rope import rope_inverse_frequencies

__all__ = ["MODEL", "PLAN", "CausalLM", "DecoderLayer", "LlamaForCausalLM", "RMSNorm", "from_gguf_layout",
           "gguf_tensor", "hf_tensor", "rope_inverse_frequencies", "unpermute_rows"]

MODEL = LlamaForCausalLM = CausalLM
hf_tensor = same_name
gguf_tensor = gguf_from_hf(hf_tensor)


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation for ``heads`` whole heads of rows (weight or bias).

    llama.cpp interleaves each head's rotary pairs: its row order within a head is
    (0, D/2, 1, D/2 + 1, ...); Hugging Face's is (0, 1, ..., D-1).
    """
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_gguf_layout(name: str, tensor: torch.Tensor, config: ModelConfig, gguf_architecture: str) -> torch.Tensor:
    """A slice of a GGUF tensor (model name ``name``) in Hugging Face's layout. llama.cpp
    permutes the rows of Q and K within each head for ``llama`` files; the slice's rows hold whole heads."""
    if gguf_architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
        return unpermute_rows(tensor, tensor.shape[0] // config.head_dim)
    return tensor
