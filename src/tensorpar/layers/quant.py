"""Weight-only quantized weights for inference, and the one ``linear`` the parallel layers call.

After loading, a layer's float weight W [out, in] (its own shard) can be replaced by a module that
holds it packed and computes y = x W^T (``loading.quantize`` does so for a whole model). Every
packed format is a ``BlockCodes``: small integer codes and one scale (and, for affine formats, one
bias) per group of ``group`` consecutive inputs,

    W[r, c] = scale[r, c // group] * (codes[r, c] - offset) + bias[r, c // group].

Three kernels run them:

- ``Int8Weight`` (``--quantization int8``): symmetric, one scale per output row:
  W_rj ~ s_r q_rj, q in [-127, 127], s_r = max_j |W_rj| / 127, on
  ``torch.ops.aten._weight_int8pack_mm``.
- ``NibbleWeight``: codes of up to 8 bits in groups of 32 on torch's int4 kernel
  (``_weight_int4pack_mm_for_cpu``, which computes sum_j x_j ((n_j - 8) s_g + z_g) for nibbles n).
  A code of b bits is split into ceil(b / 4) nibble planes, code = sum_p 16^p n_p, laid side by side
  along the input, and the activations are repeated once per plane: plane p has scale 16^p s and
  zero 8 * 16^p s, except one plane that also carries -offset * s + bias. So int4 (``--quantization
  int4``: asymmetric, q in [0, 15]) is one plane, and GGUF's Q4_0, Q4_1, Q4_K (one plane), Q5_0,
  Q5_1, Q5_K and Q8_0 (two planes) run with the file's own codes.
- ``RowBlocksWeight``: any other group size (Q6_K's 16): the codes are dequantized a block of
  rows at a time into one reused float32 buffer, each block multiplied as it is made.

Each rank packs its own shard, so a group never straddles a shard boundary: the groups are those
of the rank's columns. A shard whose width is not a multiple of ``group`` (an uneven split of the
MLP, say 1536 over 5 ranks) is quantized per row as ``int8`` instead. A GGUF shard whose columns
start or end inside a block keeps the whole blocks and multiplies zero-padded activations.

The int4 kernel takes its activations, scales and zeros in bfloat16 and the result returns in the
input's dtype (``benchmarks/quant_kernels.py`` measures the choice: with float32 or float16
activations the kernels fall to slow paths). So the scales of a GGUF block are rounded from float16
to bfloat16 (a relative 2^-9) and the offset sits on the plane where it is exact (Q4_0, Q5_0, Q8_0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from tensorpar.layers import deterministic, fused

QUANTIZATIONS = ("none", "int8", "int4", "gguf")
DEFAULT_GROUP = 32
GROUPS = (32, 64, 128, 256)  # the group sizes ``--quant-group`` takes
KERNEL_DTYPE = torch.bfloat16
KERNEL_GROUP = 32  # the int4 kernel's group: every multiple of it is run as groups of 32
_PACK_ROWS = 4096  # rows packed at a time (a multiple of 64: the packing's row tiles)


@dataclass(frozen=True)
class BlockCodes:
    """W[r, c] = scale[r, c // group] * (codes[r, c] - offset) + bias[r, c // group] (no bias: 0)."""

    codes: torch.Tensor  # uint8 [rows, cols], values below 2^bits
    scale: torch.Tensor  # float32 [rows, cols / group]
    group: int
    bits: int
    offset: int = 0
    bias: torch.Tensor | None = None  # float32 [rows, cols / group]

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        """W as float32 [rows, cols]."""
        rows, cols = self.shape
        q = self.codes.float().view(rows, cols // self.group, self.group) - self.offset
        w = q * self.scale[..., None]
        if self.bias is not None:
            w = w + self.bias[..., None]
        return w.view(rows, cols)

    def regroup(self, group: int) -> BlockCodes:
        """The same weight with groups of ``group`` (a divisor of ``self.group``)."""
        if group == self.group:
            return self
        if self.group % group:
            raise ValueError(f"groups of {self.group} cannot be regrouped as {group}")
        r = self.group // group
        bias = None if self.bias is None else self.bias.repeat_interleave(r, dim=1)
        return replace(self, scale=self.scale.repeat_interleave(r, dim=1), bias=bias, group=group)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BlockCodes:
        """``fn`` (a reordering of rows) applied to the codes and their scales alike."""
        bias = None if self.bias is None else fn(self.bias)
        return replace(self, codes=fn(self.codes), scale=fn(self.scale), bias=bias)

    def narrow_cols(self, start: int, length: int) -> BlockCodes:
        """Columns [start, start + length), both multiples of ``group``."""
        if start % self.group or length % self.group:
            raise ValueError(f"columns [{start}, {start + length}) do not fall on groups of {self.group}")
        g0, g = start // self.group, length // self.group
        bias = None if self.bias is None else self.bias[:, g0 : g0 + g]
        return replace(self, codes=self.codes[:, start : start + length], scale=self.scale[:, g0 : g0 + g], bias=bias)

    @staticmethod
    def zeros(rows: int, cols: int, group: int) -> BlockCodes:
        return BlockCodes(torch.zeros(rows, cols, dtype=torch.uint8), torch.zeros(rows, cols // group), group, 1)

    @staticmethod
    def cat(parts: list[BlockCodes], dim: int) -> BlockCodes:
        """``parts`` joined along rows (0) or columns (1). Their groups must agree; their offsets are
        made one by shifting codes (an exact integer shift, to the largest offset)."""
        if len(parts) == 1:
            return parts[0]
        if len({p.group for p in parts}) > 1:
            raise ValueError(f"cannot join groups of {sorted({p.group for p in parts})}")
        offset = max(p.offset for p in parts)
        codes = [p.codes if p.offset == offset else p.codes.to(torch.int16).add(offset - p.offset) for p in parts]
        top = max(int(c.max()) if c.numel() else 0 for c in codes)
        if top > 255:
            raise ValueError("joined codes do not fit in 8 bits")
        has_bias = any(p.bias is not None for p in parts)
        bias = torch.cat([p.bias if p.bias is not None else torch.zeros_like(p.scale) for p in parts], dim) if has_bias else None
        return BlockCodes(torch.cat([c.to(torch.uint8) for c in codes], dim), torch.cat([p.scale for p in parts], dim),
                          parts[0].group, max(max(p.bits for p in parts), top.bit_length()), offset, bias)


def int4_codes(weight: torch.Tensor, group: int) -> BlockCodes:
    """``weight`` [out, in] as asymmetric 4-bit codes in groups of ``group``: W ~ s q + lo with
    s = (max - min) / 15 (rounded to bfloat16, as the kernel reads it) and lo the group's minimum."""
    w = weight.detach().float().contiguous()
    out, k = w.shape
    if k % group:
        raise ValueError(f"int4 groups of {group} do not tile a {k}-wide weight")
    groups = w.view(out, k // group, group)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # [out, k / group]
    step = ((hi - lo) / 15).clamp(min=1e-8).to(KERNEL_DTYPE).float()
    q = torch.round((groups - lo[..., None]) / step[..., None]).clamp(0, 15).to(torch.uint8).view(out, k)
    return BlockCodes(q, step, group, 4, bias=lo)


class QuantizedWeight(nn.Module):
    """A packed [out, in] weight; calling it on x [..., in] gives x W^T [..., out]."""

    scheme = ""
    activation_dtype = KERNEL_DTYPE
    shape: torch.Size

    def dequantize(self) -> torch.Tensor:
        """W as float32 [out, in], as the kernel sees it."""
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, x.shape[-1]).to(self.activation_dtype))  # [rows, out]
        return y.to(x.dtype).view(*lead, self.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.scheme}, out={self.shape[0]}, in={self.shape[1]}"


INT8_K_MULTIPLE = 16  # torch's int8 kernel reads past the end of a row (SIGSEGV) when several rows
# meet an input width that is not a multiple of 16 (torch 2.13, CPU): such a weight is zero-padded


class Int8Weight(QuantizedWeight):
    scheme = "int8"

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float().contiguous()
        self.shape = w.shape
        self.pad = -w.shape[1] % INT8_K_MULTIPLE  # zero columns after the weight's own
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-30).to(KERNEL_DTYPE)  # [out], as the kernel reads it
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("q", F.pad(q, (0, self.pad)).contiguous())  # [out, in + pad]
        self.register_buffer("scale", scale)

    def dequantize(self) -> torch.Tensor:
        return self.q[:, : self.shape[1]].float() * self.scale.float()[:, None]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(F.pad(x, (0, self.pad)) if self.pad else x, self.q, self.scale)


class _Padded(QuantizedWeight):
    """Codes whose columns run ``pad = (before, after)`` past the rank's own on either side (whole
    GGUF blocks around a shard that cuts one): the activations are zero-padded to match."""

    BLOCK_VALUES = 1 << 15  # rows dequantized at a time by ``_by_row_blocks``: 128 KB of float32, kept in cache

    def __init__(self, codes_shape: torch.Size, pad: tuple[int, int]):
        super().__init__()
        self.pad = pad
        self.shape = torch.Size((codes_shape[0], codes_shape[1] - pad[0] - pad[1]))
        self._buffer = torch.empty(0)

    def _rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """W[r0:r1] as float32 [r1 - r0, in + pads] (into ``out`` when given)."""
        raise NotImplementedError

    def _by_row_blocks(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """x [n, k] -> x W^T [n, rows]: ``BLOCK_VALUES`` values' worth of W's rows at a time
        dequantized into one reused buffer (``_rows``), each block then multiplied
        (y^T[block] = W[block] x^T)."""
        k = x.shape[1]
        block = max(1, self.BLOCK_VALUES // k)
        if self._buffer.numel() < block * k:
            self._buffer = torch.empty(block * k)
        yt = x.new_empty(rows, x.shape[0])  # [rows, n]
        for r in range(0, rows, block):
            n = min(block, rows - r)
            torch.mm(self._rows(r, r + n, self._buffer[: n * k]), x.t(), out=yt[r : r + n])
        return yt.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad) if any(self.pad) else x)

    def _cols(self, w: torch.Tensor) -> torch.Tensor:
        return w[:, self.pad[0] : w.shape[1] - self.pad[1]]


class NibbleWeight(_Padded):
    """Codes of up to 8 bits in groups of a multiple of 32, as nibble planes on the int4 kernel."""

    def __init__(self, codes: BlockCodes, pad: tuple[int, int] = (0, 0), scheme: str = "int4"):
        super().__init__(codes.shape, pad)
        c = codes.regroup(KERNEL_GROUP)
        out, k = c.shape
        self.scheme, self.planes = scheme, -(-c.bits // 4)
        self.k = k
        rows = -(-out // 16) * 16  # the packing takes rows in sixteens
        s = c.scale.to(KERNEL_DTYPE).float()  # [out, k / 32]
        home = min(range(self.planes), key=lambda p: abs(8 * 16**p - c.offset))
        groups = k // KERNEL_GROUP
        sz = torch.zeros(self.planes * groups, rows, 2, dtype=KERNEL_DTYPE)  # [planes * k / 32, rows, 2]
        for p in range(self.planes):
            sp = s * 16**p
            zp = 8 * sp
            if p == home:
                zp = zp - c.offset * s + (c.bias if c.bias is not None else 0)
            sz[p * groups : (p + 1) * groups, :out, 0] = sp.t()
            sz[p * groups : (p + 1) * groups, :out, 1] = zp.t()
            del sp, zp
        self.register_buffer("scale_zeros", sz)
        packed = torch.empty(rows, self.planes * k // 2, dtype=torch.uint8)
        for r in range(0, rows, _PACK_ROWS):
            block = c.codes[r : r + _PACK_ROWS]
            block = F.pad(block, (0, 0, 0, min(rows, r + _PACK_ROWS) - r - block.shape[0]))  # zero rows to sixteens
            planes = torch.cat([(block >> (4 * p)) & 15 for p in range(self.planes)], dim=1)  # [rows, planes * k]
            packed[r : r + len(block)] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                planes.to(torch.int32).contiguous(), 1)
        self.register_buffer("packed", packed)
        self.rows = rows

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.planes > 1:
            x = x.repeat(1, self.planes)  # [n, planes * k]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, KERNEL_GROUP, self.scale_zeros)
        return y[:, : self.shape[0]] if self.rows != self.shape[0] else y

    def dequantize(self) -> torch.Tensor:
        eye = torch.eye(self.k, dtype=KERNEL_DTYPE)  # row j of eye W^T is W's column j
        return self._cols(self._matmul(eye).float().t().contiguous())


class RowBlocksWeight(_Padded):
    """Codes in groups the int4 kernel does not take (Q6_K's 16), in float32: dequantized a block
    of rows at a time into one reused buffer, each block then multiplied (``_by_row_blocks``)."""

    activation_dtype = torch.float32

    def __init__(self, codes: BlockCodes, pad: tuple[int, int] = (0, 0), scheme: str = "gguf"):
        super().__init__(codes.shape, pad)
        self.scheme, self.group = scheme, codes.group
        q = codes.codes.to(torch.int16) - codes.offset
        small = int(q.min()) >= -128 and int(q.max()) <= 127
        self.register_buffer("q", q.to(torch.int8 if small else torch.int16).contiguous())
        self.register_buffer("scale", codes.scale.contiguous())
        self.register_buffer("bias", None if codes.bias is None else codes.bias.contiguous())
        self.k = codes.shape[1]

    def _rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        n, k, g = r1 - r0, self.k, self.group
        w = torch.mul(self.q[r0:r1].view(n, k // g, g), self.scale[r0:r1, :, None],
                      out=None if out is None else out.view(n, k // g, g))
        if self.bias is not None:
            w.add_(self.bias[r0:r1, :, None])
        return w.view(n, k)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._by_row_blocks(x, self.q.shape[0])

    def dequantize(self) -> torch.Tensor:
        return self._cols(self._rows(0, self.q.shape[0]))


class GroupCodesWeight(_Padded):
    """Codes in groups on the fused product (``layers.fused.codes_linear``), as compact as they
    come: codes of up to 4 bits two to a byte (per group of 32: byte j holds element j in its low
    nibble, element j + 16 in its high one), others one signed byte each, a float16 scale and
    zero per group (Q4_1's 20 bytes per 32 weights). With c the stored code,

        W[n, k] = scale[n, g] c[n, k] + zero[n, g]   (g = k // group),

    so y[t, n] = sum_g scale[n, g] dot(c[n, g], x[t, g]) + zero[n, g] sum(x[t, g]): a code of more
    than 4 bits is stored as code - offset where that fits a signed byte (zero = bias), else as
    code - 128 (zero = scale (128 - offset) + bias); a 4-bit one as it is (zero = bias - scale
    offset). A prefill (more than ``fused.DECODE_ROWS`` rows) runs on torch's GEMM instead, the
    weight dequantized a block of rows at a time."""

    activation_dtype = torch.float32

    def __init__(self, codes: BlockCodes, pad: tuple[int, int] = (0, 0), scheme: str = "gguf"):
        super().__init__(codes.shape, pad)
        self.scheme, self.group = scheme, codes.group
        out, k = codes.shape
        self.k, self.bits = k, 4 if codes.bits <= 4 else 8
        scale = codes.scale.float()
        bias = codes.bias.float() if codes.bias is not None else torch.zeros_like(scale)
        if self.bits == 4:
            quads = codes.codes.view(out, k // 32, 2, 16)
            packed = (quads[:, :, 0] | (quads[:, :, 1] << 4)).reshape(out, k // 2)
            zero = bias - scale * codes.offset
        else:  # c - offset where it fits a signed byte (every GGUF type), else c - 128
            shift = codes.offset if codes.offset - 128 <= 0 <= codes.offset + 127 - (2**codes.bits - 1) else 128
            packed = (codes.codes.to(torch.int16) - shift).to(torch.int8)
            zero = bias + scale * (shift - codes.offset)
        self._store(packed, scale, zero)

    @classmethod
    def symmetric_rows(cls, weight: torch.Tensor, scheme: str = "int8") -> GroupCodesWeight:
        """``weight`` [out, in] as int8 with one scale per row: W_rj ~ s_r q_rj, q in [-127, 127],
        s_r = max_j |W_rj| / 127 (no zero term)."""
        w = weight.detach().float().contiguous()
        scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-30)  # [out, 1]: one group per row
        self = cls.__new__(cls)
        _Padded.__init__(self, w.shape, (0, 0))
        self.scheme, self.group, self.k, self.bits = scheme, w.shape[1], w.shape[1], 8
        self._store(torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale, None)
        return self

    def _store(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        self.register_buffer("codes", codes.contiguous())  # (scales in float16, as GGUF's own)
        self.register_buffer("scale", scale.to(torch.float16).contiguous())
        self.register_buffer("zero", None if zero is None or not zero.any() else zero.to(torch.float16).contiguous())

    def _rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        n, k, g = r1 - r0, self.k, self.group
        c = self.codes[r0:r1]
        if self.bits == 4:
            c = c.view(n, k // 32, 16)
            c = torch.stack([c & 15, c >> 4], dim=2)  # [n, k / 32, low / high nibbles, 16]
        c = c.reshape(n, k // g, g)
        w = torch.mul(c, self.scale[r0:r1, :, None].float(), out=None if out is None else out.view(n, k // g, g))
        if self.zero is not None:
            w.add_(self.zero[r0:r1, :, None].float())
        return w.view(n, k)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= fused.DECODE_ROWS and fused.active(x):
            return fused.codes_linear(x, self.codes, self.scale, self.zero, self.group, self.bits)
        return self._by_row_blocks(x, self.codes.shape[0])

    def dequantize(self) -> torch.Tensor:
        return self._cols(self._rows(0, self.codes.shape[0]))


class StackedRows(QuantizedWeight):
    """Packed weights for consecutive runs of output rows (a fused projection whose parts are
    stored in formats of different group sizes); y = [x W_1^T, x W_2^T, ...]."""

    def __init__(self, parts: list[QuantizedWeight]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.scheme = "+".join(dict.fromkeys(p.scheme for p in parts))
        self.shape = torch.Size((sum(p.shape[0] for p in parts), parts[0].shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])


class CodesTable(nn.Module):
    """An embedding table [rows, dim] kept as its file's codes: a lookup dequantizes only the rows
    it reads (the LM head tied to it holds its own packing for the product)."""

    def __init__(self, codes: BlockCodes):
        super().__init__()
        self.register_buffer("codes", codes.codes.contiguous())
        self.register_buffer("scale", codes.scale.contiguous())
        self.register_buffer("bias", None if codes.bias is None else codes.bias.contiguous())
        self.offset, self.group, self.shape = codes.offset, codes.group, codes.shape

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [...] -> [..., dim] float32
        flat = ids.reshape(-1)
        rows = BlockCodes(self.codes[flat], self.scale[flat], self.group, 8, self.offset,
                          None if self.bias is None else self.bias[flat])
        return rows.dequantize().view(*ids.shape, self.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def embedding(ids: torch.Tensor, weight) -> torch.Tensor:
    """weight[ids] for a float or a ``CodesTable`` weight."""
    return weight.lookup(ids) if isinstance(weight, CodesTable) else F.embedding(ids, weight)


def pack_codes(codes: BlockCodes, pad: tuple[int, int] = (0, 0), scheme: str = "gguf") -> QuantizedWeight:
    """The fastest kernel for ``codes``: the fused product where it runs (groups of a multiple of
    32, or 16 for codes of more than 4 bits), else the int4 kernel where its groups are multiples
    of 32 and the codes have at most 8 bits, otherwise row blocks."""
    if fused.available() and codes.bits <= 8 and codes.group % (32 if codes.bits <= 4 else 16) == 0:
        return GroupCodesWeight(codes, pad, scheme)
    if codes.group % KERNEL_GROUP == 0 and codes.bits <= 8:
        return NibbleWeight(codes, pad, scheme)
    return RowBlocksWeight(codes, pad, scheme)


def quantize_weight(weight: torch.Tensor, scheme: str, group: int = DEFAULT_GROUP) -> QuantizedWeight:
    """``weight`` [out, in] packed as ``scheme`` (``int4`` falls back to ``int8`` where ``group``
    does not divide ``in``)."""
    if scheme == "int4" and weight.shape[1] % group == 0:
        return pack_codes(int4_codes(weight, group), scheme="int4")
    if scheme in ("int8", "int4"):
        if fused.available() and weight.shape[1] % 16 == 0:
            return GroupCodesWeight.symmetric_rows(weight)
        return Int8Weight(weight)
    raise ValueError(f"unknown quantization {scheme!r}; choose from int8, int4")


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for a float or a quantized W (a decode step's few rows on the fused product
    where it runs)."""
    if isinstance(weight, QuantizedWeight):
        y = weight(x)
        return y + bias if bias is not None else y
    if fused.streams(x, weight) or deterministic.enabled():  # (deterministic: always the fixed-order kernel)
        return fused.dense_linear(x, weight, bias)
    return F.linear(x, weight, bias)
