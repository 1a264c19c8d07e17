"""GGUF blocks kept packed (``loading.gguf_codes``, ``layers.quant``): the codes of every type
dequantize to exactly what ``gguf.quants`` dequantizes, and each kernel multiplies with them,
shards that cut a block included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from tensorpar.layers import fused
from tensorpar.layers.quant import BlockCodes, GroupCodesWeight, NibbleWeight, RowBlocksWeight, StackedRows, pack_codes
from tensorpar.loading.gguf_codes import PACKED_TYPES, decode

FLOAT16_FIELDS = {  # byte offsets of each block's float16 scales (d, m / dmin)
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def random_blocks(qtype: Q, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random bytes as blocks, with finite float16 scales: uint8 [rows, blocks_per_row * block bytes]."""
    rng = np.random.default_rng(seed)
    size = GGML_QUANT_SIZES[qtype][1]
    b = rng.integers(0, 256, (rows * blocks_per_row, size), dtype=np.uint8)
    for at in FLOAT16_FIELDS[qtype.name]:
        b[:, at : at + 2] = rng.uniform(-0.05, 0.05, len(b)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b.reshape(rows, -1)


def test_every_packed_type_has_its_scales_listed():
    assert set(PACKED_TYPES) == set(FLOAT16_FIELDS)


@pytest.mark.parametrize("name", PACKED_TYPES)
def test_codes_dequantize_to_what_gguf_dequantizes(name):
    qtype = Q[name]
    blocks = random_blocks(qtype, 5, 3)
    codes = decode(blocks, qtype)
    want = dequantize(blocks, qtype)
    assert codes.shape == want.shape and codes.codes.dtype == torch.uint8
    assert int(codes.codes.max()) < 2**codes.bits
    np.testing.assert_allclose(codes.dequantize().numpy(), want, rtol=1e-6, atol=0)


def test_an_unsupported_type_has_no_codes():
    assert decode(np.zeros((1, GGML_QUANT_SIZES[Q.Q2_K][1]), np.uint8), Q.Q2_K) is None


@pytest.mark.parametrize("name", PACKED_TYPES)
@pytest.mark.parametrize("pad", [(0, 0), (7, 9)])
@pytest.mark.parametrize("fast", [False, True], ids=["torch-kernels", "fused"])
def test_the_kernel_multiplies_with_the_codes(name, pad, fast):
    """x W^T within bfloat16 rounding of the exact product (float32 rounding for row blocks), or on
    the fused product within float16 rounding of the scales (and for 4-bit codes the activations'
    8-bit codes), including a shard whose columns start 7 in and end 9 before its groups' edges."""
    if fast and not fused.available():
        pytest.skip("no compiler for the fused kernels here")
    qtype = Q[name]
    codes = decode(random_blocks(qtype, 40, 2, seed=1), qtype)  # 40 rows: not a multiple of 16
    w = codes.dequantize()
    with fused.enabled(fast):
        packed = pack_codes(codes, pad)
    if fast:
        assert isinstance(packed, GroupCodesWeight) and packed.bits == (4 if codes.bits <= 4 else 8)
    else:
        assert isinstance(packed, RowBlocksWeight if name == "Q6_K" else NibbleWeight)
    assert packed.shape == (40, w.shape[1] - sum(pad))
    x = torch.randn(3, packed.shape[1], generator=torch.Generator().manual_seed(2))
    exact = F.pad(x.to(packed.activation_dtype).float(), pad) @ w.t()
    with torch.no_grad():
        got = packed(x)
    tol = (3e-2 if packed.bits == 4 else 2e-3) if fast else 1e-6 if name == "Q6_K" else 1e-2
    assert got.shape == (3, 40) and float((got - exact).abs().max() / exact.abs().max()) < tol
    assert torch.allclose(packed.dequantize(), w[:, pad[0] : w.shape[1] - pad[1]], rtol=tol, atol=tol * float(w.abs().max()))


def test_q8_0_offset_sits_where_it_is_exact():
    """Q8_0's d (q - 128) with the offset on the high plane: codes of a single d equal d (q - 128)
    to bfloat16 rounding of d alone, no rounding of a -120 d zero."""
    d = 0.0123
    q = torch.arange(256, dtype=torch.uint8).view(8, 32).repeat(2, 1)  # [16, 32]
    codes = BlockCodes(q, torch.full((16, 1), d), 32, 8, offset=128)
    w = NibbleWeight(codes, scheme="gguf").dequantize()
    db = float(torch.tensor(d).to(torch.bfloat16))
    want = (q.float() - 128) * db
    assert torch.allclose(w, want, rtol=2**-8, atol=0)


def test_joined_parts_shift_codes_to_one_offset_and_stacked_rows_keep_their_groups():
    q5 = decode(random_blocks(Q.Q5_0, 16, 2), Q.Q5_0)
    q8 = decode(random_blocks(Q.Q8_0, 16, 2, seed=3), Q.Q8_0)
    joined = BlockCodes.cat([q5, q8, BlockCodes.zeros(16, 64, 32)], dim=0)
    assert joined.offset == 128 and joined.bits == 8
    assert torch.equal(joined.dequantize(), torch.cat([q5.dequantize(), q8.dequantize(), torch.zeros(16, 64)]))
    q6 = decode(random_blocks(Q.Q6_K, 16, 1), Q.Q6_K)
    q4 = decode(random_blocks(Q.Q4_K, 16, 1), Q.Q4_K)
    with pytest.raises(ValueError, match="cannot join groups"):
        BlockCodes.cat([q4, q6], dim=0)
    stacked = StackedRows([pack_codes(q4), pack_codes(q6)])
    x = torch.randn(2, 256)
    want = x.bfloat16().float() @ torch.cat([q4.dequantize(), q6.dequantize()]).t()
    assert stacked(x).shape == (2, 32)
    assert float((stacked(x) - want).abs().max() / want.abs().max()) < 1e-2
