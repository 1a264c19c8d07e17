"""Weight-only quantization (``layers.quant``): each packed weight computes x W^T with the weight it
dequantizes to, and stays within the format's rounding of the float weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tensorpar.layers import fused
from tensorpar.layers.quant import GroupCodesWeight, Int8Weight, NibbleWeight, linear, quantize_weight


def weights(out: int, k: int, transposed: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(out * 1000 + k)
    w = torch.randn(out, k, generator=g) * 0.05
    return w.t().contiguous().t() if transposed else w  # (tensorpar's streaming layout for wide weights)


@pytest.mark.parametrize("scheme, group", [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("out, k", [(96, 128), (640, 256), (64, 384)])
@pytest.mark.parametrize("fast", [False, True], ids=["torch-kernels", "fused"])
def test_packed_weight_computes_with_what_it_dequantizes_to(scheme, group, out, k, fast):
    if fast and not fused.available():
        pytest.skip("no compiler for the fused kernels here")
    w = weights(out, k, transposed=out > k)
    with fused.enabled(fast):
        packed = quantize_weight(w, scheme, group)
    if fast:  # the fused product: int8 rows, or int4 codes in their groups
        assert isinstance(packed, GroupCodesWeight) and packed.bits == (8 if scheme == "int8" or k % group else 4)
    else:
        assert isinstance(packed, Int8Weight if scheme == "int8" or k % group else NibbleWeight)
    deq = packed.dequantize()
    assert deq.shape == (out, k)
    # rounding: int8 within half a step of 1/127 of the row's largest value; int4 within half of 1/15 of the group's range
    bound = w.abs().amax(dim=1, keepdim=True) / 127 if scheme == "int8" else 2 * w.abs().amax() / 15
    assert bool(((deq - w).abs() <= bound * 0.5 + 2e-3 * w.abs().amax()).all())
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(1))
    want = F.linear(x.to(torch.bfloat16).float(), deq)  # the kernels take bfloat16 activations
    got = linear(x, packed)
    assert got.shape == (3, 5, out) and got.dtype == torch.float32
    assert float((got - want).abs().max() / want.abs().max()) < 1e-2
    if scheme == "int8":
        assert packed.nbytes < w.numel() * 4 / 3.5
    else:
        assert packed.nbytes < w.numel() * 4 / 6


def test_int4_falls_back_to_int8_where_the_group_does_not_tile_the_shard():
    w = weights(64, 320)  # 5 heads of 64: groups of 128 do not tile it
    with fused.enabled(False):
        assert isinstance(quantize_weight(w, "int4", 128), Int8Weight)
        assert isinstance(quantize_weight(w, "int4", 64), NibbleWeight)
    if fused.available():
        assert quantize_weight(w, "int4", 128).bits == 8 and quantize_weight(w, "int4", 64).bits == 4
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_weight(w, "fp4")


def test_int8_weights_of_any_width_multiply_several_rows():
    """torch's int8 kernel reads out of bounds for widths that are not a multiple of 16 with several
    rows (a SIGSEGV): such weights are zero-padded to the next multiple."""
    from tensorpar.layers.quant import Int8Weight

    for k in (24, 44, 48, 100):
        w = torch.randn(40, k)
        packed = Int8Weight(w)
        x = torch.randn(2, 7, k)
        got = packed(x)
        want = x @ packed.dequantize().t()
        assert got.shape == (2, 7, 40) and packed.dequantize().shape == (40, k)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
