"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM): the architecture module.

Plain single-device PyTorch (``MODEL``), its sharding plan (``PLAN``) and the names of its tensors
in GGUF files. Module and parameter names follow Hugging Face, except that Q/K/V and gate/up are
fused into ``qkv_proj`` and ``gate_up_proj``; each fused linear lists its checkpoint parts in
``fused_parts``. Attention reads its local head counts from ``num_heads`` / ``num_kv_heads``,
which a sharding plan may change (see ``tensorpar.partition``).
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from tensorpar.layers.attention import AttentionBatch
from tensorpar.models.config import ModelConfig

_NO_DROPOUT = nullcontext()  # reusable: entered on every inference step


def fused_linear(in_features: int, parts: list[tuple[str, int]], bias: bool) -> nn.Linear:
    """One nn.Linear whose output rows stack the checkpoint tensors ``parts`` [(name, rows)]."""
    layer = nn.Linear(in_features, sum(n for _, n in parts), bias=bias)
    layer.fused_parts = tuple(parts)
    return layer


class _RMSNormFunction(torch.autograd.Function):
    """y = x r w with r = 1 / sqrt(mean(x^2) + eps), storing only x and r for backward.

    With x_hat = x r and g = dy * w: dw = sum(dy * x_hat) over all but the last dim, and
    dx = r (g - x_hat mean(g * x_hat)). (Autograd through the composite would also keep x_hat.)
    """

    @staticmethod
    def forward(fctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        fctx.save_for_backward(x, r, weight)
        return x * r * weight

    @staticmethod
    def backward(fctx, dy):
        x, r, weight = fctx.saved_tensors
        x_hat = x * r
        dw = (dy * x_hat).reshape(-1, x.shape[-1]).sum(0)
        g = dy * weight
        dx = r * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        return dx, dw, None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, normalized in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if torch.is_grad_enabled():
                return _RMSNormFunction.apply(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class _SwiGLUFunction(torch.autograd.Function):
    """[gate, up] -> silu(gate) * up, storing only its input for backward.

    d gate = dy * up * s (1 + gate (1 - s)) with s = sigmoid(gate); d up = dy * silu(gate).
    (Autograd through the composite would also keep silu(gate).)
    """

    @staticmethod
    def forward(fctx, gate_up):
        fctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(fctx, dy):
        (gate_up,) = fctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        s = torch.sigmoid(gate)
        return torch.cat([dy * up * s * (1 + gate * (1 - s)), dy * gate * s], dim=-1)


def rope_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """theta_i = base^(-2i/d), with Llama-3 or linear scaling when the config asks for it."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv.float()
    kind = scaling["rope_type"]
    if kind == "linear":
        return (inv / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled).float()
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] for x = [x1, x2].

    rotate_half(x) = roll(x, D/2) * [-1..-1, 1..1], so the sign is folded into ``signed_sin``.
    x: [B, S, heads, D], cos / signed_sin: [B, S, 1, D].
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions. In training, ``dropout`` applies to the
    attention probabilities, drawing its mask inside ``dropout_rng()`` (a parallel plan points it
    at a random stream of its choosing; by default the global one)."""

    dropout_site = "attention"
    dropout = 0.0
    dropout_rng = staticmethod(nullcontext)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.head_dim
        self.head_dim = d
        self.num_heads = cfg.num_heads  # local query slots after sharding
        self.num_kv_heads = cfg.num_kv_heads  # local KV heads after sharding
        self.sliding_window = cfg.sliding_window
        self.qkv_proj = fused_linear(
            cfg.hidden_size,
            [("q_proj", cfg.num_heads * d), ("k_proj", cfg.num_kv_heads * d), ("v_proj", cfg.num_kv_heads * d)],
            bias=cfg.qkv_bias,
        )
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, batch: AttentionBatch, rope: tuple[torch.Tensor, torch.Tensor],
                cache: tuple[torch.Tensor, torch.Tensor] | None):
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [B, S, (h + 2 kv) d]; S is the whole sequence under sequence parallelism
        B, S, _ = qkv.shape
        qk = apply_rope(qkv[..., : (h + kv) * d].view(B, S, h + kv, d), *rope)
        q, k = qk[:, :, :h], qk[:, :, h:]
        v = qkv[..., (h + kv) * d :].view(B, S, kv, d)
        keys, values = batch.keys_values(k, v, cache)  # [B, kv, L, d]
        mask, causal = batch.mask(self.sliding_window)
        p = self.dropout if self.training else 0.0
        with self.dropout_rng() if p else _NO_DROPOUT:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, dropout_p=p, enable_gqa=h != kv,
            )  # [B, h, S, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, h * d))


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = fused_linear(cfg.hidden_size, [("gate_proj", i), ("up_proj", i)], cfg.mlp_bias)
        self.down_proj = nn.Linear(i, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if torch.is_grad_enabled():
            return self.down_proj(_SwiGLUFunction.apply(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x)). In training, ``dropout`` applies to each branch
    before it joins the residual stream, its mask drawn inside ``dropout_rng()``."""

    dropout_site = "residual"
    dropout = 0.0
    dropout_rng = staticmethod(nullcontext)

    def _dropout(self, h: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.dropout):
            return h
        with self.dropout_rng():
            return F.dropout(h, self.dropout, training=True)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, batch, rope, cache):
        x = x + self._dropout(self.self_attn(self.input_layernorm(x), batch, rope, cache))
        mlp = self._dropout(self.mlp(self.post_attention_layernorm(x)))
        return x + mlp if torch.is_grad_enabled() else x.add_(mlp)  # the norm keeps x for backward


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # (weights come from a checkpoint: no random init, which on the meta device costs a second of imports)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Token ids -> final hidden states (``forward``) -> vocabulary logits (``logits``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def rope_tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin (see apply_rope), [length, D], grown (doubling) on demand and kept."""
        if self._rope is None or self._rope[0].shape[0] < length or self._rope[0].device != device:
            n = max(length, 2 * (self._rope[0].shape[0] if self._rope else 256))
            inv = rope_inverse_frequencies(self.config).to(device)
            freqs = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            sign = torch.cat((-torch.ones_like(inv), torch.ones_like(inv)))
            self._rope = (emb.cos(), emb.sin() * sign)
        return self._rope

    def rotary(self, batch: AttentionBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin at the batch's positions, [B, S, 1, D] each."""
        cos, sin = self.rope_tables(batch.max_position + 1, batch.positions.device)
        return cos[batch.positions].unsqueeze(2).to(dtype), sin[batch.positions].unsqueeze(2).to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        batch: AttentionBatch | None = None,
        cache=None,
    ) -> torch.Tensor:
        """input_ids: [B, S] -> final-normed hidden states [B, S, hidden].

        ``batch`` says where the tokens are and what they attend to (default: every row a fresh
        sequence from position 0); ``cache`` is a ``KVCache`` whose slots ``batch`` names.
        """
        if batch is None:
            batch = AttentionBatch.fresh(*input_ids.shape, input_ids.device)
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary(batch, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, batch, rope, None if cache is None else cache.layer(i))
        return self.model.norm(x)

    def kv_cache_shape(self) -> list[tuple[int, int]]:
        """(local KV heads, head dim) of every layer's cache."""
        return [(layer.self_attn.num_kv_heads, layer.self_attn.head_dim) for layer in self.model.layers]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., vocab] (gathered over ranks when the head is vocab-parallel)."""
        return self.lm_head(hidden)


MODEL = LlamaForCausalLM

# Data flow per layer: the replicated hidden state enters column-parallel QKV and gate/up
# ("all-to-sharded"), attention and the activation run on local heads / local intermediate
# columns, and row-parallel o_proj / down_proj all-reduce back to a replicated hidden state
# ("sharded-to-all"). Two all-reduces per layer. Norms are replicated.
PLAN: dict[str, str] = {
    "model.embed_tokens": "vocab_embedding",
    "model.layers.*.self_attn.qkv_proj": "colwise_heads",
    "model.layers.*.self_attn.o_proj": "rowwise_heads",
    "model.layers.*.mlp.gate_up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "lm_head": "vocab_head",
}

_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_tensor_name(name: str) -> str | None:
    """The Hugging Face name of GGUF tensor ``name``, or None for tensors the model does not use."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _GGUF_BLOCK.fullmatch(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation for ``heads`` whole heads of rows (weight or bias).

    llama.cpp interleaves each head's rotary pairs: its row order within a head is
    (0, D/2, 1, D/2 + 1, ...); Hugging Face's is (0, 1, ..., D-1).
    """
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_gguf_layout(name: str, tensor: torch.Tensor, config: ModelConfig, gguf_architecture: str) -> torch.Tensor:
    """A slice of GGUF tensor (Hugging Face name ``name``) in Hugging Face's layout. llama.cpp
    permutes the rows of Q and K within each head for ``llama`` files; the slice's rows hold whole heads."""
    if gguf_architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
        return unpermute_rows(tensor, tensor.shape[0] // config.head_dim)
    return tensor
