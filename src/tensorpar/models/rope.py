"""Rotary position embeddings: the inverse frequencies of each scaling (linear, Llama 3, LongRoPE,
llama.cpp's per-frequency factors), the cos / sin tables grown on demand, and their application
to queries and keys. Plain single-device code, shared by every architecture that uses RoPE."""

from __future__ import annotations

import math

import torch

from tensorpar.layers.attention import AttentionBatch, PackedBatch
from tensorpar.models.config import ModelConfig


def inverse_frequencies(head_dim: int, base: float, scaling: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """theta_i = base^(-2i/d), scaled as ``scaling`` says: (inverse frequencies [d/2], and for
    LongRoPE the long-context ones, else None).

    linear: theta_i / factor. llama3: low frequencies / factor, high ones kept, a smooth ramp
    between. longrope: theta_i / short_factor_i (long_factor_i beyond the pretrained length).
    factors (llama.cpp's rope_freqs): theta_i / factors_i.
    """
    d = head_dim
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv.float(), None
    if kind == "linear":
        return (inv / scaling["factor"]).float(), None
    if kind == "factors":
        return (inv / torch.tensor(scaling["factors"], dtype=torch.float64)).float(), None
    if kind == "longrope":  # transformers computes these in float32: so do we
        shape = torch.arange(0, d, 2, dtype=torch.int64).float() / d
        short, long = (1.0 / (torch.tensor(scaling[k], dtype=torch.float32) * base ** shape)
                       for k in ("short_factor", "long_factor"))
        return short, long
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled).float(), None
    raise ValueError(f"unsupported rope scaling type {kind!r}")


def rope_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The (global layers', short-context) inverse frequencies of ``cfg``."""
    return inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)[0]


def longrope_attention_factor(scaling: dict) -> float:
    """LongRoPE scales cos and sin by sqrt(1 + ln(factor) / ln(original length)) (1 when factor <= 1)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class Rotary:
    """cos and sign-folded sin tables (see ``apply_rope``) for one (base, scaling), grown on demand.

    LongRoPE: a row whose largest position is at or beyond the pretrained length uses the long
    factors for all its tokens, as transformers does for a forward whose positions reach so far
    (keys already cached keep the rotation they were written with).
    """

    def __init__(self, head_dim: int, base: float, scaling: dict | None):
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        longrope = (scaling or {}).get("rope_type") == "longrope"
        self.switch_at = scaling["original_max_position_embeddings"] if longrope else None
        self.factor = longrope_attention_factor(scaling) if longrope else 1.0
        self._tables: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, long: bool, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._tables.get(long)
        if t is None or t[0].shape[0] < length or t[0].device != device:
            n = max(length, 2 * (t[0].shape[0] if t else 256))
            with torch.device("cpu"):  # (the model may have been built under the meta device)
                short_inv, long_inv = inverse_frequencies(self.head_dim, self.base, self.scaling)
            inv = (long_inv if long else short_inv).to(device)
            freqs = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            sign = torch.cat((-torch.ones_like(inv), torch.ones_like(inv)))
            t = self._tables[long] = (emb.cos() * self.factor, emb.sin() * self.factor * sign)
        return t

    def __call__(self, batch: AttentionBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin at the batch's positions, [B, S, 1, D] each."""
        if isinstance(batch, PackedBatch) and self.switch_at is not None:  # the long factors go by sequence
            tables = [self(part, dtype) for part in batch.parts]
            return tuple(torch.cat([t[i].reshape(1, -1, 1, self.head_dim) for t in tables], dim=1) for i in (0, 1))
        pos, n = batch.positions, batch.max_position + 1
        cos, sin = self._table(False, n, pos.device)
        cos, sin = cos[pos], sin[pos]
        if self.switch_at is not None and n > self.switch_at:
            long = (pos.amax(dim=1) + 1 > self.switch_at).view(-1, 1, 1)  # [B, 1, 1]
            lcos, lsin = self._table(True, n, pos.device)
            cos, sin = torch.where(long, lcos[pos], cos), torch.where(long, lsin[pos], sin)
        return cos.unsqueeze(2).to(dtype), sin.unsqueeze(2).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] for x = [x1, x2].

    rotate_half(x) = roll(x, D/2) * [-1..-1, 1..1], so the sign is folded into ``signed_sin``.
    x: [B, S, heads, D], cos / signed_sin: [B, S, 1, D].
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
