"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) as plain single-device PyTorch.

Module and parameter names follow Hugging Face, except that Q/K/V and gate/up are fused into
``qkv_proj`` and ``gate_up_proj``; each fused linear lists its checkpoint parts in
``fused_parts``. Attention reads its local head counts from ``num_heads`` / ``num_kv_heads``,
which a sharding plan may change (see ``tensorpar.partition``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


@dataclass
class AttentionBatch:
    """Per-forward attention inputs shared by every layer.

    cos, sin: [B, S, 1, D] rotary tables at each query position (sin sign-folded, see apply_rope).
    mask:     [B, 1, S, L] True where query s may attend key l; None when every query may attend
              every key (or ``causal``: plain causal attention over exactly the new tokens).
    slots:    cache slot of each sequence, [B]; ``slot_start`` when they are consecutive;
              ``slot_rows`` the slot of each new token, [B, S].
    positions: [B, S] absolute positions (where new keys are written in the cache).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    positions: torch.Tensor
    causal: bool = False
    slots: torch.Tensor | None = None
    slot_rows: torch.Tensor | None = None
    slot_start: int | None = None
    kv_len: int = 0


class KVCache:
    """Preallocated keys and values, one [slots, kv_heads_local, max_len, D] pair per layer.

    Reserved, not touched: a slot's memory is zeroed (and so becomes resident) the first time a
    sequence starts in it (``start``). Zeroed matters: a batch reads each slot up to the longest
    sequence's length, masked, and a masked NaN would still poison the attention output.
    """

    def __init__(self, num_layers, slots, kv_heads, max_len, head_dim, dtype, device):
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.max_len = slots, max_len
        self._zeroed: set[int] = set()

    def fits(self, slots: int, max_len: int) -> bool:
        return slots <= self.slots and max_len <= self.max_len

    def start(self, slot: int) -> None:
        """A sequence begins in ``slot``: make sure its memory holds finite values."""
        if slot not in self._zeroed:
            for t in (*self.k, *self.v):
                t[slot].zero_()
            self._zeroed.add(slot)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions. In training, ``dropout`` applies to the
    attention probabilities, drawing its mask inside ``dropout_rng()`` (a parallel plan points it
    at a random stream of its choosing; by default the global one)."""

    dropout = 0.0
    dropout_rng = staticmethod(nullcontext)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.head_dim
        self.head_dim = d
        self.num_heads = cfg.num_heads  # local query slots after sharding
        self.num_kv_heads = cfg.num_kv_heads  # local KV heads after sharding
        self.qkv_proj = fused_linear(
            cfg.hidden_size,
            [("q_proj", cfg.num_heads * d), ("k_proj", cfg.num_kv_heads * d), ("v_proj", cfg.num_kv_heads * d)],
            bias=cfg.qkv_bias,
        )
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, batch: AttentionBatch, cache: tuple[torch.Tensor, torch.Tensor] | None):
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [B, S, (h + 2 kv) d]; S is the whole sequence under sequence parallelism
        B, S, _ = qkv.shape
        qk = apply_rope(qkv[..., : (h + kv) * d].view(B, S, h + kv, d), batch.cos, batch.sin)
        q, k = qk[:, :, :h], qk[:, :, h:]
        v = qkv[..., (h + kv) * d :].view(B, S, kv, d)
        if cache is None:  # (a copy of v, so that backward does not keep all of qkv alive)
            keys, values = k.transpose(1, 2), v.transpose(1, 2).contiguous()  # [B, kv, S, d]
        else:
            ck, cv = cache
            ck[batch.slot_rows, :, batch.positions] = k  # write [B, S, kv, d] at (slot, :, position)
            cv[batch.slot_rows, :, batch.positions] = v
            L = batch.kv_len
            if batch.slot_start is not None:
                keys = ck[batch.slot_start : batch.slot_start + B, :, :L]  # [B, kv, L, d]
                values = cv[batch.slot_start : batch.slot_start + B, :, :L]
            else:
                keys, values = ck[batch.slots, :, :L], cv[batch.slots, :, :L]
        p = self.dropout if self.training else 0.0
        with self.dropout_rng() if p else _NO_DROPOUT:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=batch.mask, is_causal=batch.causal,
                dropout_p=p, enable_gqa=h != kv,
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

    def forward(self, x, batch, cache):
        x = x + self._dropout(self.self_attn(self.input_layernorm(x), batch, cache))
        mlp = self._dropout(self.mlp(self.post_attention_layernorm(x)))
        return x + mlp if torch.is_grad_enabled() else x.add_(mlp)  # the norm keeps x for backward


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
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

    def attention_batch(
        self,
        positions: torch.Tensor,
        slots: torch.Tensor | None = None,
        kv_len: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> AttentionBatch:
        """Rotary tables and the causal (optionally sliding-window) mask for one forward.

        positions: [B, S]. Without a cache (``slots=None``) the keys are the queries' own tokens;
        with one, the keys are cache positions 0..kv_len-1 of each sequence's slot.
        """
        cos, sin = self.rope_tables(int(positions.max()) + 1, positions.device)
        cos = cos[positions].unsqueeze(2).to(dtype)  # [B, S, 1, D]
        sin = sin[positions].unsqueeze(2).to(dtype)
        if slots is None:
            key_pos = positions  # [B, L=S]
        else:
            key_pos = torch.arange(kv_len, device=positions.device).expand(positions.shape[0], kv_len)
        B, S = positions.shape
        L = key_pos.shape[1]
        window = self.config.sliding_window
        within_window = window is None or L <= window
        causal = False
        mask = None
        if S == 1 and within_window and bool((positions[:, 0] == L - 1).all()):
            pass  # one new token per sequence, after every cached one: attend to all keys
        elif S == L and within_window and (
            (B == 1 and (slots is None or int(positions[0, 0]) == 0))
            or (slots is None and bool((positions == torch.arange(S, device=positions.device)).all()))
        ):
            causal = True  # fresh sequences from position 0: plain causal attention over their own tokens
        else:
            q = positions.unsqueeze(-1)  # [B, S, 1]
            kp = key_pos.unsqueeze(1)  # [B, 1, L]
            mask = kp <= q
            if window is not None:
                mask &= kp > q - window
            mask = mask.unsqueeze(1)
        start = None
        if slots is not None:
            s0 = int(slots[0])
            if torch.equal(slots, torch.arange(s0, s0 + slots.numel(), device=slots.device)):
                start = s0
        return AttentionBatch(
            cos=cos, sin=sin, mask=mask, causal=causal, positions=positions,
            slots=slots, slot_rows=None if slots is None else slots.unsqueeze(1).expand(B, S),
            slot_start=start, kv_len=kv_len or 0,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """input_ids: [B, S] -> final-normed hidden states [B, S, hidden]."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self.model.embed_tokens(input_ids)
        batch = self.attention_batch(positions, slots if cache is not None else None, kv_len, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, batch, None if cache is None else (cache.k[i], cache.v[i]))
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., vocab] (gathered over ranks when the head is vocab-parallel)."""
        return self.lm_head(hidden)
