"""Weight-only quantized weights for inference, and the one ``linear`` the parallel layers call.

After loading, a layer's float weight W [out, in] (its own shard) can be replaced by a module that
holds it packed and computes y = x W^T with a kernel torch ships for CPU:

- ``int8``: symmetric, one scale per output row: W_rj ~ s_r q_rj, q in [-127, 127],
  s_r = max_j |W_rj| / 127 (``torch.ops.aten._weight_int8pack_mm``).
- ``int4``: asymmetric, in groups of ``group`` consecutive inputs: W_rj ~ (q_rj - 8) s_rg + z_rg,
  q in [0, 15], s_rg = (max - min) / 15 and z_rg = min + 8 s_rg over the group
  (``_weight_int4pack_mm_for_cpu`` on the nibbles packed by ``_convert_weight_to_int4pack_for_cpu``;
  scales and zeros in bfloat16, as the kernel takes them).

Each rank quantizes its own shard, so a group never straddles a shard boundary: the groups are
those of the rank's columns. A shard whose width is not a multiple of ``group`` (an uneven split
of the MLP, say 1536 over 5 ranks) is quantized per row as ``int8`` instead.

The activations enter the kernels in bfloat16 and the result returns in the input's dtype
(``benchmarks/quant_kernels.py`` measures the choice: with float32 activations the int8 kernel
falls to a slow path).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANTIZATIONS = ("none", "int8", "int4")
DEFAULT_GROUP = 32
GROUPS = (32, 64, 128, 256)  # the group sizes the int4 kernel takes
KERNEL_DTYPE = torch.bfloat16


class QuantizedWeight(nn.Module):
    """A packed [out, in] weight; calling it on x [..., in] gives x W^T [..., out]."""

    scheme = ""
    shape: torch.Size

    def dequantize(self) -> torch.Tensor:
        """W as float32 [out, in], as the kernel sees it."""
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE))  # [rows, out]
        return y.to(x.dtype).view(*lead, self.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.scheme}, out={self.shape[0]}, in={self.shape[1]}"


class Int8Weight(QuantizedWeight):
    scheme = "int8"

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float().contiguous()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-30).to(KERNEL_DTYPE)  # [out], as the kernel reads it
        self.register_buffer("q", torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale)
        self.shape = w.shape

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)


class Int4Weight(QuantizedWeight):
    scheme = "int4"

    def __init__(self, weight: torch.Tensor, group: int):
        super().__init__()
        w = weight.detach().float().contiguous()
        out, k = w.shape
        if k % group:
            raise ValueError(f"int4 groups of {group} do not tile a {k}-wide weight")
        groups = w.view(out, k // group, group)
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # [out, k / group]
        step = ((hi - lo) / 15).clamp(min=1e-8).to(KERNEL_DTYPE)
        zeros = (lo + 8 * step.float()).to(KERNEL_DTYPE)  # the kernel computes (q - 8) * scale + zero
        q = torch.round((groups - zeros.float()[..., None]) / step.float()[..., None] + 8)
        q = q.clamp(0, 15).to(torch.int32).view(out, k)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scale_zeros", torch.stack([step, zeros], dim=-1).transpose(0, 1).contiguous())
        # scale_zeros: [k / group, out, 2]
        self.group, self.shape = group, w.shape

    def dequantize(self) -> torch.Tensor:
        eye = torch.eye(self.shape[1], dtype=KERNEL_DTYPE)  # row j of eye W^T is W's column j
        return self._matmul(eye).float().t().contiguous()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scale_zeros)


def quantize_weight(weight: torch.Tensor, scheme: str, group: int = DEFAULT_GROUP) -> QuantizedWeight:
    """``weight`` [out, in] packed as ``scheme`` (``int4`` falls back to ``int8`` where ``group``
    does not divide ``in``)."""
    if scheme == "int4" and weight.shape[1] % group == 0:
        return Int4Weight(weight, group)
    if scheme in ("int8", "int4"):
        return Int8Weight(weight)
    raise ValueError(f"unknown quantization {scheme!r}; choose from {', '.join(QUANTIZATIONS)}")


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for a float or a quantized W."""
    if isinstance(weight, QuantizedWeight):
        y = weight(x)
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)


def quantize_model(model: nn.Module, scheme: str, group: int = DEFAULT_GROUP) -> dict:
    """Replace the weight of every column-, row-parallel linear and LM head of ``model`` (this
    rank's shards) by its ``scheme`` packing, in place; the embedding stays float (a tied head
    gets a packed copy of its rows). Returns {scheme used: matrices}."""
    from tensorpar.layers.embedding import ParallelLMHead
    from tensorpar.layers.linear import ColumnParallelLinear, RowParallelLinear

    used: dict[str, int] = {}
    if scheme == "none":
        return used
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
            weight = module.weight
            if isinstance(weight, QuantizedWeight) or weight.device.type != "cpu":
                continue
            packed = quantize_weight(weight, scheme, group)
            if "weight" in module._parameters:
                del module._parameters["weight"]
            module.weight = packed
            used[packed.scheme] = used.get(packed.scheme, 0) + 1
    return used
