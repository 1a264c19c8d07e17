"""GGUF quantization blocks as ``BlockCodes``: each block's integer codes and the scale (and bias)
of each of its groups, exactly as llama.cpp's dequantization defines them (ggml-quants.c, and
``gguf.quants``'s ``dequantize_blocks``, whose values ``BlockCodes.dequantize`` reproduces):

    =====  ======  =====  ====  =====================================================
    type   values  group  bits  value
    =====  ======  =====  ====  =====================================================
    Q4_0       32     32     4  d (q - 8)
    Q4_1       32     32     4  d q + m
    Q5_0       32     32     5  d (q - 16)
    Q5_1       32     32     5  d q + m
    Q8_0       32     32     8  d (q - 128)                    (q: the int8 plus 128)
    Q4_K      256     32     4  d sc_j q - dmin m_j             (6-bit sc_j, m_j per 32)
    Q5_K      256     32     5  d sc_j q - dmin m_j
    Q6_K      256     16     6  d sc_j (q - 32)                 (int8 sc_j per 16)
    =====  ======  =====  ====  =====================================================

(d, m, dmin: float16 per block.) The layouts within a block follow ``gguf.quants``. Any other type
has no codes here (``decode`` returns None) and is read as float.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import Q4_K as _Q4K

from tensorpar.layers.quant import BlockCodes


def _f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes [n, ..., width] as 4-bit values [n, ..., 2 * width]: low nibbles, then high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray, n: int) -> np.ndarray:
    """The 32 bits of each block's u32 [n, 4 bytes] as [n, 32] (bit i: value i)."""
    bits = qh.copy().view(np.uint32).reshape(n, 1) >> np.arange(32, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def _q4_0(b, n):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:]), d, 8, None


def _q4_1(b, n):
    return _nibbles(b[:, 4:]), _f16(b[:, :2]), 0, _f16(b[:, 2:4])


def _q5_0(b, n):
    return _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6], n) << 4), _f16(b[:, :2]), 16, None


def _q5_1(b, n):
    return _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8], n) << 4), _f16(b[:, :2]), 0, _f16(b[:, 2:4])


def _q8_0(b, n):
    return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), _f16(b[:, :2]), 128, None


def _k_scales(b, n):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _Q4K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))  # [n, 8] each


def _q4_k(b, n):
    scale, bias = _k_scales(b, n)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32))  # [n, 4 pairs, 64]: sub-blocks 2i, 2i + 1
    return q.reshape(n, 256), scale, 0, bias


def _q5_k(b, n):
    scale, bias = _k_scales(b, n)
    ql = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    qh = (b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1  # [n, 8, 32]
    return (ql | (qh << 4)).reshape(n, 256), scale, 0, bias


def _q6_k(b, n):
    ql = b[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(n, 8, 32)
    scale = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    return (ql | (qh << 4)).reshape(n, 256), scale, 32, None


_DECODERS = {  # type: (decoder, group, bits)
    Q.Q4_0: (_q4_0, 32, 4), Q.Q4_1: (_q4_1, 32, 4), Q.Q5_0: (_q5_0, 32, 5), Q.Q5_1: (_q5_1, 32, 5),
    Q.Q8_0: (_q8_0, 32, 8), Q.Q4_K: (_q4_k, 32, 4), Q.Q5_K: (_q5_k, 32, 5), Q.Q6_K: (_q6_k, 16, 6),
}
PACKED_TYPES = tuple(t.name for t in _DECODERS)


def group_of(ggml_type: int) -> int | None:
    """The group size of a type's codes, or None where it has none here."""
    entry = _DECODERS.get(Q(ggml_type))
    return entry[1] if entry else None


def decode(blocks: np.ndarray, ggml_type: int) -> BlockCodes | None:
    """Rows of whole blocks (uint8 [rows, blocks per row x block bytes]) as codes, or None for a
    type without codes here."""
    entry = _DECODERS.get(Q(ggml_type))
    if entry is None:
        return None
    fn, group, bits = entry
    per_block, block_bytes = GGML_QUANT_SIZES[Q(ggml_type)]
    rows = blocks.shape[0]
    flat = np.ascontiguousarray(blocks).reshape(-1, block_bytes)
    n = flat.shape[0]
    codes, scale, offset, bias = fn(flat, n)
    cols = n * per_block // rows if rows else 0

    def grid(a):  # per block [n, groups of a block] -> per row [rows, cols / group]
        return torch.from_numpy(np.ascontiguousarray(a.reshape(rows, -1), dtype=np.float32))

    return BlockCodes(torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, cols))), grid(scale), group, bits,
                      offset, None if bias is None else grid(bias))
