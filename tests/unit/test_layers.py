"""Parallel layers without a process group: each rank's shard is loaded on its own and the
per-rank results are recombined by hand (concatenation for column-parallel, summation for
row-parallel) and compared with the unsharded computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorpar.layers.embedding as embedding_mod
from tensorpar.distributed.groups import ParallelContext
from tensorpar.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    Segment,
    VocabParallelEmbedding,
)
from tensorpar.layers.pieces import fill_from_pieces, model_pieces
from tensorpar.partition import even_split, even_splits, head_rows, head_shard, slot_segments, vocab_shard

CPU = torch.device("cpu")


def ctx(rank: int, world_size: int) -> ParallelContext:
    return ParallelContext(rank=rank, world_size=world_size, device=CPU, backend="none", group=None)


def make_reader(tensors: dict[str, torch.Tensor], log: list | None = None):
    """A reader (``fill_from_pieces``) over full tensors named ``<part>.<param>``; logs each request."""

    def read(part, param, rows=None, cols=None):
        if log is not None:
            log.append((part, param, rows, cols))
        t = tensors[f"{part}.{param}"]
        if rows is not None:
            t = t[rows.start : rows.stop]
        if cols is not None:
            t = t[:, cols.start : cols.stop]
        return t.clone()

    return read


def load(layer: nn.Module, read) -> None:
    """Fill each of ``layer``'s parameters as its ``pieces()`` say (what the loader does)."""
    for name, pieces in layer.pieces().items():
        fill_from_pieces(getattr(layer, name).data, pieces, read)


def head_segments(num_heads, num_kv, head_dim, tp, rank, part):
    shard = head_shard(num_heads, num_kv, tp, rank)
    return [
        Segment(part, s) if s is not None else Segment(None, range(head_dim))
        for s in slot_segments(shard, head_dim)
    ]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- column-parallel


@pytest.mark.parametrize("tp", range(1, 6))
def test_column_parallel_plain_concatenates_to_full(tp):
    g = gen(tp)
    out, inp = 11, 7
    w, b = torch.randn(out, inp, generator=g), torch.randn(out, generator=g)
    x = torch.randn(3, 5, inp, generator=g)
    read = make_reader({"proj.weight": w, "proj.bias": b})
    ys = []
    for r in range(tp):
        layer = ColumnParallelLinear(inp, [Segment("proj", even_split(out, tp, r))], True, ctx(r, tp))
        load(layer, read)
        span = even_split(out, tp, r)
        assert layer.weight.shape == (len(span), inp) and layer.bias.shape == (len(span),)
        torch.testing.assert_close(layer.weight.data, w[span.start : span.stop], rtol=0, atol=0)
        ys.append(F.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(torch.cat(ys, dim=-1), F.linear(x, w, b))


@pytest.mark.parametrize("tp", range(1, 6))
def test_column_parallel_fused_parts(tp):
    """gate/up style: each part split evenly; local rows are [gate_r; up_r]."""
    g = gen(10 + tp)
    n, inp = 9, 6
    wg, wu = torch.randn(n, inp, generator=g), torch.randn(n, inp, generator=g)
    bg, bu = torch.randn(n, generator=g), torch.randn(n, generator=g)
    x = torch.randn(4, inp, generator=g)
    read = make_reader({"gate_proj.weight": wg, "gate_proj.bias": bg, "up_proj.weight": wu, "up_proj.bias": bu})
    gates, ups = [], []
    for r in range(tp):
        span = even_split(n, tp, r)
        layer = ColumnParallelLinear(inp, [Segment("gate_proj", span), Segment("up_proj", span)], True, ctx(r, tp))
        load(layer, read)
        assert layer.out_features == 2 * len(span)
        y = F.linear(x, layer.weight, layer.bias)
        gate, up = y.split([len(span), len(span)], dim=-1)
        gates.append(gate)
        ups.append(up)
    torch.testing.assert_close(torch.cat(gates, -1), F.linear(x, wg, bg))
    torch.testing.assert_close(torch.cat(ups, -1), F.linear(x, wu, bu))


HEAD_CASES = [(9, 3, 2), (9, 3, 4), (6, 2, 4), (4, 1, 4), (6, 3, 5), (8, 8, 3), (12, 4, 5)]


@pytest.mark.parametrize("num_heads, num_kv, tp", HEAD_CASES)
def test_column_parallel_qkv_with_head_padding(num_heads, num_kv, tp):
    d, hidden = 4, 10
    g = gen(num_heads * 100 + tp)
    wq = torch.randn(num_heads * d, hidden, generator=g)
    wk = torch.randn(num_kv * d, hidden, generator=g)
    wv = torch.randn(num_kv * d, hidden, generator=g)
    bq, bk, bv = (torch.randn(t.shape[0], generator=g) for t in (wq, wk, wv))
    tensors = {"q_proj.weight": wq, "k_proj.weight": wk, "v_proj.weight": wv,
               "q_proj.bias": bq, "k_proj.bias": bk, "v_proj.bias": bv}
    x = torch.randn(2, 3, hidden, generator=g)
    full_q = F.linear(x, wq, bq).view(2, 3, num_heads, d)
    full_k = F.linear(x, wk, bk).view(2, 3, num_kv, d)
    full_v = F.linear(x, wv, bv).view(2, 3, num_kv, d)
    seen_heads = []
    for r in range(tp):
        shard = head_shard(num_heads, num_kv, tp, r)
        kv = head_rows(shard.kv_heads, d)
        segs = head_segments(num_heads, num_kv, d, tp, r, "q_proj") + [Segment("k_proj", kv), Segment("v_proj", kv)]
        layer = ColumnParallelLinear(hidden, segs, True, ctx(r, tp))
        layer.weight.data.fill_(float("nan"))  # every row must be written by loading
        layer.bias.data.fill_(float("nan"))
        log = []
        load(layer, make_reader(tensors, log))
        assert all(rows is not None and cols is None for _, _, rows, cols in log)  # only slices are read
        assert not layer.weight.isnan().any() and not layer.bias.isnan().any()
        h, k = shard.num_slots, shard.num_kv
        assert layer.weight.shape == ((h + 2 * k) * d, hidden)
        y = F.linear(x, layer.weight, layer.bias)
        q, kk, vv = y.split([h * d, k * d, k * d], dim=-1)
        q = q.view(2, 3, h, d)
        for slot, head in enumerate(shard.q_slots):
            if head is None:  # padding slot: zero weight and zero bias
                assert torch.count_nonzero(layer.weight[slot * d : (slot + 1) * d]) == 0
                assert torch.count_nonzero(layer.bias[slot * d : (slot + 1) * d]) == 0
                assert torch.count_nonzero(q[:, :, slot]) == 0
            else:
                torch.testing.assert_close(q[:, :, slot], full_q[:, :, head])
                seen_heads.append(head)
        torch.testing.assert_close(kk.view(2, 3, k, d), full_k[:, :, shard.kv_heads.start : shard.kv_heads.stop])
        torch.testing.assert_close(vv.view(2, 3, k, d), full_v[:, :, shard.kv_heads.start : shard.kv_heads.stop])
    assert seen_heads == list(range(num_heads))


# ---------------------------------------------------------------- row-parallel


@pytest.mark.parametrize("tp", range(1, 6))
@pytest.mark.parametrize("bias", [False, True])
def test_row_parallel_sums_to_full(tp, bias):
    g = gen(20 + tp)
    inp, out = 13, 5
    w, b = torch.randn(out, inp, generator=g), torch.randn(out, generator=g)
    x = torch.randn(2, 3, inp, generator=g)
    read = make_reader({"down_proj.weight": w, "down_proj.bias": b})
    total = torch.zeros(2, 3, out)
    for r in range(tp):
        span = even_split(inp, tp, r)
        layer = RowParallelLinear([Segment("down_proj", span)], out, bias, ctx(r, tp))
        load(layer, read)
        assert layer.weight.shape == (out, len(span))
        torch.testing.assert_close(layer.weight.data, w[:, span.start : span.stop], rtol=0, atol=0)
        if bias:
            torch.testing.assert_close(layer.bias.data, b, rtol=0, atol=0)  # full bias, added once
        else:
            assert layer.bias is None
        total += F.linear(x[..., span.start : span.stop], layer.weight)
    expected = F.linear(x, w, b if bias else None)
    torch.testing.assert_close(total + (b if bias else 0), expected)


@pytest.mark.parametrize("num_heads, num_kv, tp", HEAD_CASES)
def test_row_parallel_over_head_slots_ignores_padding_inputs(num_heads, num_kv, tp):
    """o_proj over padded head slots: padding columns are zero, so garbage in padding slots of the
    attention output cannot leak into the sum."""
    d, hidden = 4, 7
    g = gen(300 + num_heads * 10 + tp)
    w, b = torch.randn(hidden, num_heads * d, generator=g), torch.randn(hidden, generator=g)
    x = torch.randn(5, num_heads, d, generator=g)  # per-head attention output
    read = make_reader({"o_proj.weight": w, "o_proj.bias": b})
    total = torch.zeros(5, hidden)
    for r in range(tp):
        shard = head_shard(num_heads, num_kv, tp, r)
        layer = RowParallelLinear(head_segments(num_heads, num_kv, d, tp, r, "o_proj"), hidden, True, ctx(r, tp))
        layer.weight.data.fill_(float("nan"))
        load(layer, read)
        assert layer.weight.shape == (hidden, shard.num_slots * d)
        local = torch.empty(5, shard.num_slots, d)
        for slot, head in enumerate(shard.q_slots):
            if head is None:
                assert torch.count_nonzero(layer.weight[:, slot * d : (slot + 1) * d]) == 0
                local[:, slot] = 1e3 * torch.randn(5, d, generator=g)
            else:
                local[:, slot] = x[:, head]
        total += F.linear(local.reshape(5, -1), layer.weight)
    torch.testing.assert_close(total + b, F.linear(x.reshape(5, -1), w, b))


# ---------------------------------------------------------------- world size 1: real forward


def test_world_size_one_forward_matches_nn_linear_and_embedding():
    g = gen(42)
    c = ctx(0, 1)
    lin = nn.Linear(6, 9)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(9, 6, generator=g))
        lin.bias.copy_(torch.randn(9, generator=g))
    x = torch.randn(2, 4, 6, generator=g)
    tensors = {"p.weight": lin.weight.detach(), "p.bias": lin.bias.detach()}

    col = ColumnParallelLinear(6, [Segment("p", range(9))], True, c)
    load(col, make_reader(tensors))
    assert torch.equal(col(x), lin(x))

    row = RowParallelLinear([Segment("p", range(6))], 9, True, c)
    load(row, make_reader(tensors))
    assert torch.equal(row(x), lin(x))

    emb = nn.Embedding(17, 5)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(17, 5, generator=g))
    ids = torch.randint(0, 17, (3, 6), generator=g)
    vemb = VocabParallelEmbedding(range(17), 5, c, "embed_tokens")
    load(vemb, make_reader({"embed_tokens.weight": emb.weight.detach()}))
    assert torch.equal(vemb(ids), emb(ids))

    h = torch.randn(3, 5, generator=g)
    head = ParallelLMHead(range(17), [17], 5, c, "lm_head")
    load(head, make_reader({"lm_head.weight": emb.weight.detach() * 2}))
    assert torch.equal(head(h), F.linear(h, emb.weight * 2))
    tied = ParallelLMHead(range(17), [17], 5, c, "lm_head")
    tied.tie(vemb)
    assert torch.equal(tied(h), F.linear(h, emb.weight))


def test_world_size_one_forward_backward_matches_nn_linear():
    g = gen(7)
    c = ctx(0, 1)
    w, b = torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    col = ColumnParallelLinear(3, [Segment("p", range(4))], True, c)
    load(col, make_reader({"p.weight": w, "p.bias": b}))
    x = torch.randn(5, 3, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    col(x).square().sum().backward()
    F.linear(x_ref, w, b).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


# ---------------------------------------------------------------- vocabulary parallel


@pytest.mark.parametrize("vocab, tp", [(17, 1), (17, 2), (17, 3), (17, 5), (16, 4), (301, 4), (5, 5)])
def test_vocab_parallel_embedding_shards_and_sum(vocab, tp, monkeypatch):
    g = gen(vocab * 10 + tp)
    dim = 6
    table = torch.randn(vocab, dim, generator=g)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    ids[0, :3] = torch.tensor([0, vocab - 1, vocab // 2])
    read = make_reader({"embed_tokens.weight": table})
    # Without a group the all-reduce is the identity: each rank returns its partial sum.
    monkeypatch.setattr(embedding_mod, "reduce_from_tp", lambda x, ctx: x)
    total = torch.zeros(3, 11, dim)
    for r in range(tp):
        span = vocab_shard(vocab, tp, r)
        emb = VocabParallelEmbedding(span, dim, ctx(r, tp), "embed_tokens")
        load(emb, read)
        assert emb.weight.shape == (len(span), dim)
        assert torch.equal(emb.weight.data, table[span.start : span.stop])
        with torch.no_grad():
            part = emb(ids)
        inside = (ids >= span.start) & (ids < span.stop)
        assert torch.count_nonzero(part[~inside]) == 0  # ids of other ranks contribute zeros
        assert torch.equal(part[inside], table[ids[inside]])
        total += part
    torch.testing.assert_close(total, F.embedding(ids, table), rtol=0, atol=0)


@pytest.mark.parametrize("vocab, tp", [(17, 2), (17, 3), (17, 4), (16, 4), (301, 4), (250, 6), (7, 7)])
def test_lm_head_gathers_full_vocabulary(vocab, tp, monkeypatch):
    g = gen(vocab + tp)
    dim = 5
    w = torch.randn(vocab, dim, generator=g)
    h = torch.randn(2, 3, dim, generator=g)
    full = F.linear(h, w)
    sizes = [len(s) for s in even_splits(vocab, tp)]
    heads = []
    for r in range(tp):
        head = ParallelLMHead(vocab_shard(vocab, tp, r), sizes, dim, ctx(r, tp), "lm_head")
        load(head, make_reader({"lm_head.weight": w}))
        heads.append(head)
    with torch.no_grad():
        locals_ = [hd.local_logits(h) for hd in heads]
    torch.testing.assert_close(torch.cat(locals_, dim=-1), full)
    # Simulate the all-gather: every rank sends its logits padded to max(sizes).
    padded = [F.pad(t, (0, max(sizes) - t.shape[-1])) for t in locals_]

    def fake_gather(x, c):
        assert x.shape[-1] == max(sizes)
        torch.testing.assert_close(x, padded[c.rank], rtol=0, atol=0)
        return torch.cat(padded, dim=-1)

    monkeypatch.setattr(embedding_mod, "gather_from_tp", fake_gather)
    for hd in heads:
        with torch.no_grad():
            out = hd(h)
        assert out.shape == (2, 3, vocab)
        torch.testing.assert_close(out, full)


def test_tied_lm_head_shares_the_embedding_parameter():
    vocab, dim, tp = 19, 4, 3
    table = torch.randn(vocab, dim, generator=gen(5))
    sizes = [len(s) for s in even_splits(vocab, tp)]

    class Parent(nn.Module):
        def __init__(self, r):
            super().__init__()
            span = vocab_shard(vocab, tp, r)
            self.embed_tokens = VocabParallelEmbedding(span, dim, ctx(r, tp), "embed_tokens")
            self.lm_head = ParallelLMHead(span, sizes, dim, ctx(r, tp), "lm_head")

    for r in range(tp):
        with torch.device("meta"):
            m = Parent(r)
        m.to_empty(device=CPU)  # materialized first: moving between devices would not keep a tie
        m.lm_head.tie(m.embed_tokens)
        assert m.lm_head.tied and m.lm_head.weight is m.embed_tokens.weight
        assert [n for n, _ in m.named_parameters()] == ["embed_tokens.weight"]
        assert [pp.name for pp in model_pieces(m)] == ["embed_tokens.weight"]  # loaded and saved once
        assert m.lm_head.pieces() == {}
        log = []
        load(m.embed_tokens, make_reader({"embed_tokens.weight": table}, log))
        load(m.lm_head, make_reader({}, log))  # tied: reads nothing
        assert [p for p, *_ in log] == ["embed_tokens"]
        span = vocab_shard(vocab, tp, r)
        assert torch.equal(m.lm_head.weight, table[span.start : span.stop])
        m.to(torch.float64)  # a dtype change keeps the parameter, so the head follows
        assert m.lm_head.weight is m.embed_tokens.weight and m.lm_head.weight.dtype == torch.float64
        h = torch.randn(2, dim, dtype=torch.float64, generator=gen(r))
        torch.testing.assert_close(m.lm_head.local_logits(h), F.linear(h, table[span.start : span.stop].double()))
    with pytest.raises(ValueError, match="cannot tie"):
        ParallelLMHead(range(5), [5, 5], dim, ctx(0, 2), "lm_head").tie(
            VocabParallelEmbedding(range(5, 10), dim, ctx(1, 2), "embed_tokens"))


def test_padding_segments_are_zero_even_over_garbage():
    """A padding segment zeroes whatever memory the parameter held before loading."""
    segs = [Segment("p", range(0, 2)), Segment(None, range(3)), Segment("p", range(4, 5))]
    w = torch.arange(12.0).view(6, 2)
    layer = ColumnParallelLinear(2, segs, True, ctx(0, 2))
    layer.weight.data.fill_(7.0)
    layer.bias.data.fill_(7.0)
    load(layer, make_reader({"p.weight": w, "p.bias": torch.arange(6.0)}))
    expected = torch.cat([w[0:2], torch.zeros(3, 2), w[4:5]])
    assert torch.equal(layer.weight.data, expected)
    assert torch.equal(layer.bias.data, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 4.0]))


@pytest.mark.parametrize("vocab, tp", [(17, 1), (17, 3), (16, 4), (301, 4)])
def test_only_the_leader_gets_logits_in_full_or_as_argmax_and_log_probability(vocab, tp, monkeypatch):
    g = gen(vocab * tp)
    dim = 6
    w = torch.randn(vocab, dim, generator=g)
    h = torch.randn(4, dim, generator=g)
    w[5] = w[vocab - 1] = w[3]  # ties across ranks: the first index wins, as argmax of the full row
    full = F.linear(h, w)
    sizes = [len(s) for s in even_splits(vocab, tp)]
    heads = []
    for r in range(tp):
        head = ParallelLMHead(vocab_shard(vocab, tp, r), sizes, dim, ctx(r, tp), "lm_head")
        load(head, make_reader({"lm_head.weight": w}))
        heads.append(head)
    sent = {}

    def fake_gather(x, c):  # followers send their share; rank 0 (run last) receives all of them
        sent[c.rank] = x.clone()
        return torch.stack([sent[r] for r in range(c.world_size)]) if c.rank == 0 else None

    with torch.no_grad():
        local = torch.cat([hd.local_logits(h) for hd in heads], dim=-1)  # what the ranks compute
    torch.testing.assert_close(local, full)
    monkeypatch.setattr(embedding_mod, "gather", fake_gather)
    for method in ("logits_to_leader", "greedy_to_leader"):
        outs = [getattr(heads[r], method)(h) for r in [*range(1, tp), 0]]
        assert all(o is None for o in outs[:-1])
        if method == "logits_to_leader":
            torch.testing.assert_close(outs[-1], local, rtol=0, atol=0)
            assert all(s.shape[-1] == max(sizes) for s in sent.values())  # equal shares, padded
        else:
            ids, logprobs = outs[-1]
            assert torch.equal(ids, local.argmax(-1))
            torch.testing.assert_close(logprobs, local.log_softmax(-1).max(-1).values, rtol=1e-6, atol=1e-6)
            assert all(s.shape == (4, 3) for s in sent.values())  # three numbers per row, whatever the vocabulary


def test_large_pieces_are_read_in_head_aligned_row_chunks(monkeypatch):
    """A piece larger than CHUNK_VALUES is read a run of rows at a time, each run starting on a
    multiple of ``chunk_align`` rows of the full tensor; the result equals one whole read."""
    import tensorpar.layers.pieces as pieces_mod
    from tensorpar.layers.pieces import Piece, split_pieces

    monkeypatch.setattr(pieces_mod, "CHUNK_VALUES", 40)
    full = {"q.weight": torch.randn(48, 7), "e.weight": torch.randn(30, 5)}
    log: list = []
    read = make_reader(full, log)
    q = torch.empty(24, 7)
    fill_from_pieces(q, split_pieces([("q", range(16, 40))], "weight", 0), read, chunk_align=4)
    torch.testing.assert_close(q, full["q.weight"][16:40], rtol=0, atol=0)
    assert [r for _, _, r, _ in log] == [range(16, 20), range(20, 24), range(24, 28), range(28, 32),
                                         range(32, 36), range(36, 40)]  # 40 values: 4 rows of 7 (aligned)
    log.clear()
    e = torch.empty(30, 5)
    fill_from_pieces(e, [Piece("e", "weight")], read, chunk_align=1)
    torch.testing.assert_close(e, full["e.weight"], rtol=0, atol=0)
    assert [len(r) for _, _, r, _ in log] == [8, 8, 8, 6]
    log.clear()
    fill_from_pieces(e, [Piece("e", "weight")], read)  # no chunk_align: one read
    assert log == [("e", "weight", None, None)]
