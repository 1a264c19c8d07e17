"""A Llama-like architecture with post-norm layers (the original Transformer's placement): the
architecture module of model_type ``postnorm_llama``, defined outside the package.

Each layer normalises the residual stream after each addition instead of each branch's input:
x = norm_attn(x + attn(x)), then x = norm_mlp(x + mlp(x)); the final norm follows the last layer
as in Llama. Attention, MLP, rotary positions, the plan and the checkpoint names are the Llama
family's; the config is read by ``tensorpar.models.readers.read_llama``.
"""

from __future__ import annotations

from torch import nn

from tensorpar.models.blocks import MLP, PLAN, Attention, CausalLM, norm
from tensorpar.models.config import ModelConfig
from tensorpar.models.names import same_name

__all__ = ["MODEL", "PLAN", "PostNormLayer", "hf_tensor"]


class PostNormLayer(nn.Module):
    """x = post_attention_layernorm(x + attn(x)); out = post_feedforward_layernorm(x + mlp(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = norm(cfg)
        self.mlp = MLP(cfg)
        self.post_feedforward_layernorm = norm(cfg)

    def forward(self, x, batch, rope, cache):
        x = self.post_attention_layernorm(x + self.self_attn(x, batch, rope, cache))
        return self.post_feedforward_layernorm(x + self.mlp(x))


class PostNormForCausalLM(CausalLM):
    """``CausalLM`` with ``PostNormLayer`` for every layer it runs."""

    def __init__(self, cfg: ModelConfig, layers: range | None = None):
        super().__init__(cfg, layers)
        for i in self.layer_ids:
            self.model.layers[i] = PostNormLayer(cfg, i)


MODEL = PostNormForCausalLM
hf_tensor = same_name
