"""The fused CPU decode kernels against their plain-torch twins, whole decode steps of every
tiny architecture with the fused path on against the same steps with it off, and the C++
decoder-layer stack against the same kernels called module by module."""

from __future__ import annotations

import pytest
import torch

from tensorpar.distributed.groups import single_process_context
from tensorpar.layers import decode_stack, fused
from tensorpar.layers.linear import ColumnParallelLinear, RowParallelLinear
from tensorpar.layers.quant import GroupCodesWeight
from tensorpar.layers.attention import ALL_KEYS, BY_POSITION, AttentionBatch
from tensorpar.loading import build_model
from tensorpar.loading.quantize import quantize_model
from tensorpar.loading.safetensors_source import SafetensorsSource
from tensorpar.models import blocks
from tensorpar.models.norms import RMSNorm
from tensorpar.runtime.kv_cache import KVCache

from helpers import TINY_CONFIGS

pytestmark = pytest.mark.skipif(not fused.available(), reason="no compiler for the fused kernels here")
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_with_and_without_a_residual(dtype, offset):
    torch.manual_seed(0)
    x, r, w = torch.randn(5, 72, dtype=dtype), torch.randn(5, 72, dtype=dtype), torch.randn(72, dtype=dtype)
    assert torch.allclose(fused.rms_norm(x, w, 1e-5, offset), fused.rms_norm_reference(x, w, 1e-5, offset),
                          atol=TOL[dtype] * 4, rtol=TOL[dtype])
    mine, theirs = x.clone(), x.clone()
    got = fused.rms_norm(mine, w, 1e-5, offset, residual=r)
    want = fused.rms_norm_reference(theirs, w, 1e-5, offset, residual=r)
    assert torch.equal(mine, theirs)  # x += residual, in place, the same bits
    assert torch.allclose(got, want, atol=TOL[dtype] * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_glu(act):
    g = torch.randn(3, 2 * 50) * 3
    assert torch.allclose(fused.glu(g, act), fused.glu_reference(g, act), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,norms,rope", [(None, False, True), (5, True, True), (None, False, False),
                                               (30, True, False)])
def test_decode_attention_writes_the_cache_and_attends_over_the_blocks_in_place(dtype, window, norms, rope):
    torch.manual_seed(1)
    B, h, kv, d, bs = 3, 6, 2, 16, 4
    k_cache, v_cache = torch.randn(20, bs, kv, d, dtype=dtype), torch.randn(20, bs, kv, d, dtype=dtype)
    qkv = torch.randn(B, (h + 2 * kv) * d, dtype=dtype)
    blocks = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0], [9, 10, 11, 12, 13]])  # shorter rows padded
    positions = torch.tensor([17, 9, 13])
    tables = (torch.randn(B, d, dtype=dtype), torch.randn(B, d, dtype=dtype)) if rope else None
    qk_norms = None
    if norms:
        qk_norms = tuple(RMSNorm(d, 1e-6, 1.0).to(dtype) for _ in range(2))
        for n in qk_norms:
            n.weight.data.normal_()
    mine, theirs = (k_cache.clone(), v_cache.clone()), (k_cache.clone(), v_cache.clone())
    got = fused.decode_attention(qkv, mine, blocks, positions, tables, h, kv, d, 0.25, window, qk_norms)
    want = fused.decode_attention_reference(qkv, theirs, blocks, positions, tables, h, kv, d, 0.25, window, qk_norms)
    assert torch.allclose(got.float(), want.float(), atol=TOL[dtype] * 4, rtol=TOL[dtype])
    assert torch.equal(mine[1], theirs[1])  # values written as they came
    assert torch.allclose(mine[0].float(), theirs[0].float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert not torch.equal(mine[0], k_cache)  # (the new keys were written)


def test_dense_linear_gives_each_output_the_same_bits_whatever_is_computed_beside_it():
    """The fixed-order kernel: y[t, n] does not change with the rows of x beside t, the rows of W
    beside n (outputs are computed several at a time, their lane sums batched), or the threads;
    and it is the product, to rounding."""
    torch.manual_seed(0)
    for K in (16, 96, 203):  # (whole blocks, pairs of them, a tail)
        x, w = torch.randn(13, K), torch.randn(37, K)
        whole = torch.ops.tensorpar.dense_linear(x, w, None)
        assert torch.allclose(whole, x @ w.t(), atol=1e-4)
        for t in (0, 5, 12):
            assert torch.equal(torch.ops.tensorpar.dense_linear(x[t:t + 1], w, None)[0], whole[t])
        for rows in (slice(0, 1), slice(3, 10), slice(30, 37)):
            assert torch.equal(torch.ops.tensorpar.dense_linear(x, w[rows].contiguous(), None), whole[:, rows])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(torch.ops.tensorpar.dense_linear(x, w, None), whole)
        finally:
            torch.set_num_threads(threads)


def test_grid_attention_and_its_backward_against_autograd_and_unchanged_by_keys_that_follow():
    """Deterministic attention: close to softmax attention and to its autograd gradients; a
    query's output bitwise the same however many masked keys follow it (a prompt's rows and a
    decode step's agree)."""
    torch.manual_seed(0)
    B, h, S, L, d = 2, 3, 5, 21, 8
    q, k, v = (torch.randn(B, h, n, d, requires_grad=True) for n in (S, L, L))
    visible = torch.ones(S, L, dtype=torch.bool).tril(L - S).expand(B, S, L).contiguous()
    out = torch.ops.tensorpar.grid_attention(q, k, v, visible, 0.3)
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~visible[:, None], float("-inf"))
    want = scores.softmax(-1) @ v
    assert torch.allclose(out, want, atol=1e-5)
    grad = torch.randn_like(want)
    want.backward(grad)
    got = torch.ops.tensorpar.grid_attention_backward(q, k, v, visible, 0.3, grad)
    for mine, ref in zip(got, (q.grad, k.grad, v.grad)):
        assert torch.allclose(mine, ref, atol=1e-5), (mine - ref).abs().max()
    fewer = torch.ops.tensorpar.grid_attention(q[:, :, :1], k[:, :, :17], v[:, :, :17], visible[:, :1, :17], 0.3)
    assert torch.equal(fewer, out[:, :, :1])  # row 0 sees keys 0..16 of 21


def test_glu_backward_and_exp_rows_against_torch():
    torch.manual_seed(0)
    for act in ("silu", "gelu_pytorch_tanh"):
        gate_up = torch.randn(3, 2 * 37, requires_grad=True)
        ref = fused.glu_reference(gate_up, act)
        grad = torch.randn_like(ref)
        ref.backward(grad)
        got = torch.ops.tensorpar.glu_backward(gate_up.detach(), grad, fused.ACTIVATIONS[act])
        assert torch.allclose(got, gate_up.grad, atol=1e-5)
    x, shift = torch.randn(4, 50), torch.randn(4)
    assert torch.allclose(torch.ops.tensorpar.exp_rows(x, shift), torch.exp(x - shift[:, None]), rtol=1e-6)


def test_chunk_products_and_their_ordered_sum_are_the_grid_sum():
    """Deterministic mode's kernels: each span's partial product equals ``dense_linear`` of that
    span alone, bit for bit (a span's order depends on its width only), whatever the rows; their
    sum in order equals adding them one by one, and the whole is the product."""
    torch.manual_seed(0)
    w = torch.randn(40, 88)
    spans = torch.tensor([[0, 16], [16, 32], [40, 56], [32, 40], [56, 88]])
    for rows in (1, 5, 13):
        x = torch.randn(rows, 88)
        parts = torch.ops.tensorpar.chunk_products(x, w, spans)
        alone = [torch.ops.tensorpar.dense_linear(x[:, a:b].contiguous(), w[:, a:b].contiguous(), None)
                 for a, b in spans.tolist()]
        assert all(torch.equal(p, q) for p, q in zip(parts, alone))
        one_by_one = alone[0].clone()
        for q in alone[1:]:
            one_by_one += q
        assert torch.equal(torch.ops.tensorpar.ordered_sum(parts), one_by_one)
        assert torch.allclose(one_by_one, x @ w.t(), atol=1e-4)


@pytest.mark.skipif(not (fused.available() and torch.ops.tensorpar.vnni()), reason="no AVX-512 VNNI here")
@pytest.mark.parametrize("rows", [1, 3, 11])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_4_bit_products_with_8_bit_activations(rows, group):
    """x quantized per block of 32 (x_b ~ d q_b, d = max|x_b| / 127) times the codes, the zero
    terms on float sums of x: as the exact product of the dequantized blocks, and within 3% of x's own."""
    torch.manual_seed(rows + group)
    n, k = 72, 1536
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scale, zero = (torch.rand(n, k // group) * 0.02).half(), (torch.randn(n, k // group) * 0.01).half()
    x = torch.randn(rows, k)
    x[:, 5] = 40.0  # an outlier channel, as real hidden states have
    blocks = x.view(rows, -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    x_q = (torch.round(blocks / d) * d).view(rows, k)
    exact = fused.codes_linear(x, codes, scale, zero, group, 4)
    with fused.q8_activations():
        assert fused.quantizes_activations()
        got = fused.codes_linear(x, codes, scale, zero, group, 4)
    sums = x.view(rows, -1, group).sum(-1)
    want = fused.codes_linear(x_q, codes, scale, None, group, 4) + sums @ zero.float().t()
    assert (got - want).abs().max() / want.abs().max() < 2e-5
    assert 0 < (got - exact).abs().max() / exact.abs().max() < 0.03


def test_the_kernels_refuse_what_they_do_not_handle():
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        fused.glu(torch.zeros(2, 4, dtype=torch.float64), "silu")
    with pytest.raises(RuntimeError, match=r"qkv must be \[B, \(h \+ 2 kv\) d\]"):
        fused.decode_attention(torch.zeros(1, 10), (torch.zeros(2, 4, 1, 2),) * 2, torch.zeros(1, 1, dtype=torch.long),
                               torch.zeros(1, dtype=torch.long), None, 2, 1, 2, 1.0, None)


def _decode_logits(model, prompt: list[int], steps: int, dtype, fed=None) -> tuple[list, list]:
    """Prefill ``prompt``, then ``steps`` decode steps of two rows (the prompt, and the prompt
    without its last token, so the rows' lengths differ), each fed its greedy token or, given
    ``fed``, those tokens (teacher forcing): each step's logits [2, vocab], and the tokens fed."""
    cache = KVCache(model.kv_cache_shape(), 16, 4, dtype, torch.device("cpu"))
    cache.zero_through(16)  # (as the runtime does before blocks are used)
    blocks = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]])
    rows = [list(prompt), list(prompt[:-1])]
    out, tokens = [], []
    with torch.no_grad():
        for r, ids in enumerate(rows):  # each row's prompt, causal, into its blocks
            n = len(ids)
            batch = AttentionBatch(torch.arange(n).view(1, n), BY_POSITION, n - 1, n, blocks[r:r + 1, : -(-n // 4)])
            model(torch.tensor([ids]), batch, cache)
        last = [ids[-1] for ids in rows]
        for _ in range(steps):
            pos = torch.tensor([[len(rows[0]) - 1], [len(rows[1]) - 1]])
            kv_len = len(rows[0])
            batch = AttentionBatch(pos, BY_POSITION if pos[0, 0] != pos[1, 0] else ALL_KEYS, kv_len - 1, kv_len,
                                   blocks[:, : -(-kv_len // 4)])
            logits = model.logits(model(torch.tensor([[t] for t in last]), batch, cache))[:, -1]
            out.append(logits.float())
            last = logits.argmax(-1).tolist() if fed is None else fed[len(tokens)]
            tokens.append(last)
            for row, t in zip(rows, last):
                row.append(t)
    return out, tokens


@pytest.mark.parametrize("arch", sorted(set(TINY_CONFIGS) - {"llama7"}))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_is_the_same_fused_and_unfused(arch, dtype, tiny_checkpoints):
    model = build_model(SafetensorsSource(tiny_checkpoints[arch]), single_process_context(), dtype)
    prompt = [(7 * i + 3) % 100 for i in range(11)]
    with fused.enabled(False):
        plain, tokens = _decode_logits(model, prompt, 6, dtype)
    with fused.enabled(True):
        fast, _ = _decode_logits(model, prompt, 6, dtype, fed=tokens)
    for a, b in zip(fast, plain):
        scale = b.abs().max()
        assert (a - b).abs().max() / scale < (1e-5 if dtype == torch.float32 else 3e-2)


STACKED = {"llama", "mistral", "qwen2", "llama7", "qwen3", "gemma3", "phi3"}  # gated MLPs and RMSNorms throughout


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("dtype,quantization,q8", [(torch.float32, "none", False), (torch.bfloat16, "none", False),
                                                   (torch.float32, "int8", False), (torch.float32, "int4", False),
                                                   (torch.float32, "int4", True)])
def test_the_layer_stack_decodes_as_the_modules_do(arch, dtype, quantization, q8, tiny_checkpoints):
    """The same kernels in the same order: one C++ call per step against a Python call per
    operation gives the same logits, bit for bit; architectures with other parts run the modules."""
    model = build_model(SafetensorsSource(tiny_checkpoints[arch]), single_process_context(), dtype)
    quantize_model(model, quantization, group=32)
    prompt = [(5 * i + 2) % 100 for i in range(9)]
    with fused.q8_activations(q8), decode_stack.enabled(False):
        plain, tokens = _decode_logits(model, prompt, 5, dtype)
    assert model not in blocks._DECODE_STACKS
    with fused.q8_activations(q8):
        fast, _ = _decode_logits(model, prompt, 5, dtype, fed=tokens)
    packed = [m.weight for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    runs_here = all(isinstance(w, torch.Tensor) or (isinstance(w, GroupCodesWeight) and not any(w.pad)) for w in packed)
    assert bool(blocks._DECODE_STACKS[model]) == (arch in STACKED and runs_here)
    if arch == "mistral":  # widths of whole groups: its codes run in the stack
        assert blocks._DECODE_STACKS[model]
        if q8 and torch.ops.tensorpar.vnni():  # its 64-wide down_proj takes 8-bit activations: the logits move
            exact, _ = _decode_logits(model, prompt, 5, dtype, fed=tokens)
            assert not torch.equal(exact[-1], fast[-1])
    for a, b in zip(fast, plain):
        assert torch.equal(a, b), (a - b).abs().max()


def test_the_layer_stack_follows_replaced_weights(tiny_checkpoints):
    """A stack holds the weights it was built on; replacing them (a quantization after a first
    step) builds it again, so the step sees the new ones."""
    model = build_model(SafetensorsSource(tiny_checkpoints["mistral"]), single_process_context(), torch.float32)
    prompt = [3, 14, 15, 92, 65]
    before, tokens = _decode_logits(model, prompt, 2, torch.float32)
    first = blocks._DECODE_STACKS[model]
    quantize_model(model, "int8")
    after, _ = _decode_logits(model, prompt, 2, torch.float32, fed=tokens)
    assert first and blocks._DECODE_STACKS[model] and blocks._DECODE_STACKS[model] is not first
    with decode_stack.enabled(False):
        modules, _ = _decode_logits(model, prompt, 2, torch.float32, fed=tokens)
    assert all(torch.equal(a, b) for a, b in zip(after, modules))
    assert not torch.equal(after[0], before[0])
