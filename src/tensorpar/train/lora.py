"""LoRA under tensor parallelism: low-rank adapters on the sharded projections, the base frozen.

A target projection W [out, in] gains ΔW = (alpha / r) B A, with A [r, in] and B [out, r]
(Hu et al. 2021; A drawn as PEFT draws it, uniform in ±1/sqrt(in), B zero, so training starts
from the base model). The factors are split the way their base layer is:

- column-parallel base (q, k, v, gate, up; rank i holds rows S_i of W): B is split by the same
  rows, B[S_i]; A is whole on every rank. y_i = x W[S_i]^T + (alpha / r) (x A^T) B[S_i]^T.
  Each rank's gradient of A is its rows' share, so A's gradient is the sum over the group (its
  pieces overlap, and ``grads.GradientSync`` sums overlapping pieces), as is a replicated KV
  head's B rows'.
- row-parallel base (o, down; rank i holds columns C_i of W): A is split by the same columns,
  A[:, C_i]; B is whole. y = sum_i x_i W[:, C_i]^T + (alpha / r) (sum_i x_i A[:, C_i]^T) B^T: the
  small [.., r] product is all-reduced (or, under sequence parallelism, reduce-scattered) before
  B. B's gradient is then whole on every rank (a sequence shard's share under SP, summed like a
  norm weight's).

The factors are drawn in full from (seed, tensor name) and sliced, so every degree starts from
the same adapter. Fused projections (qkv, gate_up) carry one adapter per part: each part's
factors are its own checkpoint tensors, ``<layer>.q_proj.lora_A.weight`` etc. (PEFT's names).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from tensorpar.distributed.collectives import copy_to_tp, reduce_from_tp, reduce_scatter_seq
from tensorpar.errors import TensorparError
from tensorpar.layers.linear import ColumnParallelLinear, RowParallelLinear, gathered_linear
from tensorpar.layers.pieces import Piece, split_pieces

TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}
LAYERS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # checkpoint parts: q_proj, ...

    @classmethod
    def parse(cls, rank: int, alpha: float | None, targets: str) -> "LoraConfig":
        if not isinstance(rank, int) or rank < 1:
            raise TensorparError(f"--lora-rank must be a positive integer, got {rank!r}")
        names = [t.strip() for t in targets.split(",") if t.strip()]
        unknown = [t for t in names if t not in TARGETS]
        if unknown or not names:
            raise TensorparError(f"--lora-targets: {', '.join(unknown) or 'none given'}; choose from "
                                 f"{','.join(TARGETS)}")
        alpha = float(rank if alpha is None else alpha)
        if not alpha > 0:
            raise TensorparError(f"--lora-alpha must be positive, got {alpha}")
        return cls(rank, alpha, tuple(TARGETS[t] for t in TARGETS if t in names))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_json(cls, d: dict) -> "LoraConfig":
        return cls(int(d["rank"]), float(d["alpha"]), tuple(d["targets"]))


def lora_shapes(config, cfg: LoraConfig) -> dict[str, tuple[int, int]]:
    """Every adapter tensor of the model (all layers), by checkpoint name: A [r, in], B [out, r]."""
    from tensorpar.models.registry import checkpoint_shapes

    out = {}
    for name, shape in checkpoint_shapes(config).items():
        head, _, leaf = name.rpartition(".")
        prefix, _, part = head.rpartition(".")
        if leaf == "weight" and part in cfg.targets and prefix.startswith("model.layers."):
            out[f"{head}.lora_A.weight"] = (cfg.rank, shape[1])
            out[f"{head}.lora_B.weight"] = (shape[0], cfg.rank)
    return out


def initial_factor(name: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """The full initial tensor ``name``: lora_A uniform in ±1/sqrt(in) (PEFT's kaiming-uniform with
    a = sqrt(5)), drawn from (seed, name) alone; lora_B zero."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


class LoraAdapter(nn.Module):
    """The adapters of one sharded projection (``base``), its sibling in the model: parameters
    ``A_<part>`` and ``B_<part>`` for each targeted part; ``delta(x)`` is added to base(x)."""

    def __init__(self, base: nn.Module, parts: list[str], cfg: LoraConfig):
        super().__init__()
        self.scale, self.parts, r = cfg.scale, parts, cfg.rank
        self.column = isinstance(base, ColumnParallelLinear)
        self.ctx, self.segments = base.ctx, base.segments
        self._base = [base]  # (not a submodule: the base keeps its own name)
        self._pieces: dict[str, list[Piece]] = {}
        for part in parts:
            spans = [s.span for s in base.segments if s.part == part]
            local = sum(len(s) for s in spans)
            if self.column:  # A whole, B by the base's rows
                a = nn.Parameter(torch.zeros(r, base.in_features))
                b = nn.Parameter(torch.zeros(local, r))
                self._pieces[f"A_{part}"] = [Piece(part, "lora_A.weight", 0, range(r), range(r))]
                self._pieces[f"B_{part}"] = split_pieces([(part, s) for s in spans], "lora_B.weight", 0)
            else:  # A by the base's columns, B whole
                a = nn.Parameter(torch.zeros(r, local))
                b = nn.Parameter(torch.zeros(base.out_features, r))
                self._pieces[f"A_{part}"] = split_pieces([(part, s) for s in spans], "lora_A.weight", 1)
                self._pieces[f"B_{part}"] = [Piece(part, "lora_B.weight")]
            self.register_parameter(f"A_{part}", a)
            self.register_parameter(f"B_{part}", b)
        if not self.column:  # the input columns of the targeted part (not padding slots): one part
            assert len(parts) == 1, parts
            cols, at = [], 0
            for s in base.segments:
                if s.part in parts:
                    cols += range(at, at + len(s.span))
                at += len(s.span)
            self.register_buffer("cols", torch.tensor(cols), persistent=False)

    def pieces(self) -> dict[str, list[Piece]]:
        return self._pieces

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) x A^T B^T for this rank's share of the base's output (module docstring)."""
        base = self._base[0]
        a = torch.cat([getattr(self, f"A_{p}") for p in self.parts])  # [parts * r, in(_local)]
        if self.column:
            if base.sequence_parallel:  # x [B, S/p, in] -> u [B, S, parts * r]
                u = gathered_linear(x, a, None, self.ctx)
            else:
                u = torch.nn.functional.linear(copy_to_tp(x, self.ctx), a)
            us = dict(zip(self.parts, u.split(a.shape[0] // len(self.parts), dim=-1)))
            out, used = [], {p: 0 for p in self.parts}
            for s in self.segments:  # this rank's output rows, part by part
                if s.part in us:
                    b = getattr(self, f"B_{s.part}")[used[s.part] : used[s.part] + len(s.span)]
                    used[s.part] += len(s.span)
                    out.append(torch.nn.functional.linear(us[s.part], b))
                else:
                    out.append(u.new_zeros(*u.shape[:-1], len(s.span)))
            return torch.cat(out, dim=-1) * self.scale
        u = torch.nn.functional.linear(x.index_select(-1, self.cols), a)  # [.., r] partial sum
        u = reduce_scatter_seq(u, self.ctx) if base.sequence_parallel else reduce_from_tp(u, self.ctx)
        return torch.nn.functional.linear(u, getattr(self, f"B_{self.parts[0]}")) * self.scale


def _hook(adapter: LoraAdapter):
    def add_delta(module, inputs, output):
        return output + adapter.delta(inputs[0])
    return add_delta


def attach_lora(model: nn.Module, cfg: LoraConfig, seed: int, fill=None) -> list[nn.Parameter]:
    """Freeze ``model`` and give each targeted projection of its layers a ``LoraAdapter`` (a
    sibling named ``<projection>_lora``), filled by ``fill(pieces, tensor)`` (a checkpoint's
    adapter) or drawn from ``seed``; returns the adapter's parameters, the only trainable ones."""
    from tensorpar.layers.pieces import model_pieces
    from tensorpar.models.registry import checkpoint_shapes

    shapes = checkpoint_shapes(model.config)
    model.requires_grad_(False)
    adapters = []
    for i in model.layer_ids:
        layer = model.model.layers[i]
        for path in LAYERS:
            owner_name, leaf = path.split(".")
            owner = getattr(layer, owner_name, None)
            base = getattr(owner, leaf, None)
            if not isinstance(base, (ColumnParallelLinear, RowParallelLinear)):
                continue
            parts = [p for p in dict.fromkeys(s.part for s in base.segments) if p in cfg.targets]
            if not parts:
                continue
            adapter = LoraAdapter(base, parts, cfg).to(base.weight.device)
            owner.add_module(f"{leaf}_lora", adapter)
            base.register_forward_hook(_hook(adapter))
            adapters.append(adapter)
    if not adapters:
        raise TensorparError(f"--lora-targets {','.join(cfg.targets)}: the model has no such projections")
    params = []
    with torch.no_grad():
        for pp in model_pieces(model):
            if not any(pp.param is p for a in adapters for p in a.parameters()):
                continue
            if fill is not None:
                fill(pp)
            else:
                for pc in pp.pieces:
                    name = pp.full_name(pc)
                    out, inp = shapes[f"{pp.prefix}{pc.part}.weight"]  # the base projection's
                    full = initial_factor(name, (cfg.rank, inp) if ".lora_A." in name else (out, cfg.rank), seed)
                    pc.local_view(pp.param).copy_(pc.full_slice(full))
            pp.param.requires_grad_(True)
            params.append(pp.param)
    return params

