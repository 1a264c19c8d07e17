"""A decode step's decoder layers in C++ (``csrc/layer_cpu.cpp``), the collectives between them.

Each decoder layer is two halves, attention and MLP. A half joins the output of the half before
into the residual stream and runs its own work in one call:

    x += post_prev(delta);  h = norm(x);  u = h W_in^T (+ b);  c = attention(u) or act(gate) * up;
    partial = c W_out^T (+ b)

where ``delta`` is the half before's partial output reduced over the tensor-parallel ranks (its
row-parallel projection's all-reduce and bias) and ``post_prev`` its output norm, if the model
norms branch outputs (Gemma's sandwich norms). Halves with nothing to reduce between them (one
rank) run in one call: a whole decode step of a single-rank model is one call from Python, with no
per-operation dispatch. The model describes its halves (``AttentionHalf``, ``MLPHalf``); ``build``
returns None where a part cannot run here (a weight format or a layer kind the C++ side lacks),
and the model then runs its modules one by one (each on the fused kernels of ``layers.fused``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from tensorpar.layers import deterministic, fused
from tensorpar.layers.linear import ColumnParallelLinear, RowParallelLinear
from tensorpar.layers.quant import GroupCodesWeight


_state = {"on": os.environ.get("TENSORPAR_DECODE_STACK", "1") != "0"}


def enabled(on: bool):
    """Run the enclosed code with the stack on or off (off: the modules one by one; tests compare the two)."""
    return fused.switched(_state, "on", on)


def active() -> bool:
    """On, and not in deterministic mode (whose row-parallel products reduce over a grid)."""
    return _state["on"] and not deterministic.enabled()


@dataclass
class AttentionHalf:
    """norm -> qkv -> decode attention over the paged cache -> o_proj; ``post`` normalizes the output."""

    norm: nn.Module
    post: nn.Module | None
    qkv_proj: nn.Module
    o_proj: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    window: int
    rope: int  # index into the step's rotary tables, -1 for none
    cache: int  # index into the KV cache's layers


@dataclass
class MLPHalf:
    """norm -> gate_up -> act(gate) * up -> down; ``post`` normalizes the output."""

    norm: nn.Module
    post: nn.Module | None
    gate_up_proj: nn.Module
    down_proj: nn.Module
    act: str


class Unsupported(Exception):
    """A half the C++ stack cannot run as the modules would."""


def _projection(module: nn.Module, keep_bias: bool = True) -> tuple[list[torch.Tensor], int, int, torch.Tensor | None]:
    """(weight tensors, group, bits, bias) of a linear layer as ``Projection`` takes them: a float
    [out, in] weight (bits 0) or ``GroupCodesWeight`` codes, scale and zero."""
    if isinstance(module, ColumnParallelLinear) and module.sequence_parallel:
        raise Unsupported("sequence-parallel projection")
    if isinstance(module, RowParallelLinear) and (module.sequence_parallel or not module.reduce):
        raise Unsupported("row-parallel projection reduced elsewhere")
    if not isinstance(module, (nn.Linear, ColumnParallelLinear, RowParallelLinear)):
        raise Unsupported(type(module).__name__)
    bias = module.bias if keep_bias else None
    w = module.weight
    if isinstance(w, GroupCodesWeight):
        if any(w.pad):
            raise Unsupported("padded codes")
        return [w.codes, w.scale] + ([] if w.zero is None else [w.zero]), w.group, w.bits, bias
    if isinstance(w, torch.Tensor) and w.dtype in (torch.float32, torch.bfloat16) and w.is_contiguous():
        return [w], 0, 0, bias
    raise Unsupported(f"weight {type(w).__name__}")


def _norm(module: nn.Module | None) -> tuple[torch.Tensor | None, float, float]:
    if module is None:
        return None, 0.0, 0.0
    if not hasattr(module, "offset") or not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise Unsupported(type(module).__name__)  # an RMSNorm (weight, eps, offset) only
    return module.weight, module.eps, module.offset


def _finisher(out_proj: nn.Module):
    """What turns a half's partial output into its delta: a row-parallel projection's reduction
    and bias (None where there is nothing to do: one rank, no bias)."""
    if isinstance(out_proj, RowParallelLinear) and (out_proj.ctx.world_size > 1 or out_proj.bias is not None):
        return out_proj.finish
    return None


class DecodeStack:
    """The C++ ``DecodeStack`` for a list of halves, and the reductions between them."""

    def __init__(self, halves: list[AttentionHalf | MLPHalf]):
        self.stack = torch.classes.tensorpar.DecodeStack()
        self.finishers = []
        self.sources: list[nn.Module] = []  # the modules whose weights the C++ side holds
        for half in halves:
            norm, eps, offset = _norm(half.norm)
            post, post_eps, post_offset = _norm(half.post)
            if post is not None and (post_eps, post_offset) != (eps, offset):
                raise Unsupported("norms of different eps in one half")
            if isinstance(half, AttentionHalf):
                out_proj, in_proj = half.o_proj, half.qkv_proj
            else:
                out_proj, in_proj = half.down_proj, half.gate_up_proj
            finish = _finisher(out_proj)
            w_in = _projection(in_proj)
            w_out = _projection(out_proj, keep_bias=finish is None)
            if isinstance(half, AttentionHalf):
                q, q_eps, q_offset = _norm(half.q_norm)
                k, _, _ = _norm(half.k_norm)
                if q is not None and (q_eps, q_offset) != (eps, offset):
                    raise Unsupported("q/k norms of another eps")
                self.stack.add_attention(norm, post, eps, offset, *w_in, *w_out, q, k, half.heads, half.kv_heads,
                                         half.head_dim, half.scale, half.window, half.rope, half.cache)
            else:
                if half.act not in fused.ACTIVATIONS:
                    raise Unsupported(f"activation {half.act}")
                self.stack.add_mlp(norm, post, eps, offset, *w_in, *w_out, fused.ACTIVATIONS[half.act])
            self.finishers.append(finish)
            extra = (half.q_norm, half.k_norm) if isinstance(half, AttentionHalf) else ()
            self.sources += [m for m in (half.norm, half.post, in_proj, out_proj, *extra) if m is not None]
        self.caches = 1 + max(h.cache for h in halves if isinstance(h, AttentionHalf))
        self.signature = self._signature()
        self._cache_key = None

    def _signature(self) -> list:
        """Where each source module's weight lives now (read from the modules' own dicts: a step
        checks about 180 of them)."""
        out = []
        for m in self.sources:
            w = m._parameters.get("weight")
            if w is None:
                w = m._modules.get("weight") or m.__dict__.get("weight")
            out.append((w.codes if isinstance(w, GroupCodesWeight) else w).data_ptr()
                       if isinstance(w, (GroupCodesWeight, torch.Tensor)) else id(w))
        return out

    def current(self) -> bool:
        """Whether the model's weights are still those this stack was built on (not replaced or moved)."""
        return self._signature() == self.signature

    def __call__(self, x: torch.Tensor, cache, blocks: torch.Tensor, positions: torch.Tensor,
                 ropes: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x [B, hidden] (the residual stream, updated in place) -> the last half's delta [B, hidden],
        reduced and not yet joined (its ``post`` norm not applied). ``ropes``: cos and signed sin,
        [B, head_dim] float32 each, per rotary table."""
        key = (id(cache), cache.layer(0)[0].data_ptr())
        if key != self._cache_key:
            layers = [cache.layer(j) for j in range(self.caches)]
            self.stack.set_cache([k for k, _ in layers], [v for _, v in layers])
            self._cache_key = key
        cos, sin = [c for c, _ in ropes], [s for _, s in ropes]
        quantize_x = fused.quantizes_activations()
        delta, begin, n = None, 0, len(self.finishers)
        for i, finish in enumerate(self.finishers):
            if finish is not None or i == n - 1:
                delta = self.stack.run(x, delta, begin, i + 1, blocks, positions, cos, sin, quantize_x)
                if finish is not None:
                    delta = finish(delta)
                begin = i + 1
        return delta


def build(halves: list[AttentionHalf | MLPHalf]) -> DecodeStack | None:
    """The C++ stack of ``halves``, or None where one cannot run there (or the kernels are not built)."""
    if not halves or not fused.available():
        return None
    try:
        return DecodeStack(halves)
    except Unsupported:
        return None
