"""Norms of the shared blocks: RMSNorm (with Gemma's (1 + w) offset) and the architecture's choice
between it and LayerNorm. At inference on CPU an RMSNorm runs as one fused call
(``tensorpar.layers.fused.rms_norm``), which can also add a residual branch into x first."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorpar.layers import deterministic, deterministic_grads, fused
from tensorpar.models.config import ModelConfig


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
    """y = x / sqrt(mean(x^2) + eps) * (offset + w), normalized in float32 (Gemma: offset 1)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.active(x) and x.is_contiguous():
            return fused.rms_norm(x, self.weight, self.eps, self.offset)
        if deterministic.enabled() and deterministic_grads.wanted(x, self.weight):
            return deterministic_grads.rms_norm(x, self)
        w = self.weight if not self.offset else self.weight.float() + self.offset
        if x.dtype == torch.float32:
            if torch.is_grad_enabled() and not self.offset:
                return _RMSNormFunction.apply(x, w, self.eps)
            return F.rms_norm(x, w.shape, w, self.eps)
        return (w * F.rms_norm(x.float(), w.shape, None, self.eps)).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Inference: x += delta in place, then the norm of x (one fused call where it can be)."""
        if fused.active(x) and x.is_contiguous() and delta.is_contiguous() and delta.dtype == x.dtype:
            return fused.rms_norm(x, self.weight, self.eps, self.offset, residual=delta)
        return self(x.add_(delta))


def add_and_norm(norm: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Inference: x += delta in place, then ``norm(x)``."""
    return norm.add_and_norm(x, delta) if isinstance(norm, RMSNorm) else norm(x.add_(delta))


def norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The architecture's norm over ``dim`` (default: hidden) features."""
    if cfg.layer_norm:
        return nn.LayerNorm(dim or cfg.hidden_size, eps=cfg.rms_norm_eps)
    return RMSNorm(dim or cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)

