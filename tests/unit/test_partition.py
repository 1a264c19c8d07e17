"""Exhaustive checks of the shard arithmetic in ``tensorpar.partition``."""

from __future__ import annotations

from math import ceil

import pytest

from tensorpar.partition import (
    HeadShard,
    check_degree,
    even_split,
    even_splits,
    head_rows,
    head_shard,
    padded_shard_size,
    slot_segments,
    valid_degrees,
    vocab_shard,
)

MAX_HEADS = 32


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def expand_segments(segments: list[range | None], head_dim: int) -> list[int | None]:
    """One entry per local row: the global row it holds, or None for padding."""
    rows: list[int | None] = []
    for seg in segments:
        if seg is None:
            rows.extend([None] * head_dim)
        else:
            rows.extend(seg)
    return rows


def check_shard(shard: HeadShard, num_heads: int, num_kv: int, tp: int) -> None:
    g = num_heads // num_kv
    q, kv = shard.q_heads, shard.kv_heads

    # q_heads: a contiguous, non-empty span no bigger than ceil(H / tp).
    assert isinstance(q, range) and q.step == 1
    assert 1 <= len(q) <= ceil(num_heads / tp)
    assert 0 <= q.start and q.stop <= num_heads

    # kv_heads: exactly the KV heads the query heads read, as a contiguous span.
    assert isinstance(kv, range) and kv.step == 1
    assert set(kv) == {h // g for h in q}
    assert shard.num_kv == len(kv)

    # q_slots: every held query head exactly once, padding is None, num_kv * group slots.
    real = [h for h in shard.q_slots if h is not None]
    assert sorted(real) == list(q)
    assert len(real) == len(set(real))
    assert all(h is None or isinstance(h, int) for h in shard.q_slots)
    assert len(shard.q_slots) == shard.num_kv * shard.group == shard.num_slots
    assert 1 <= shard.group <= g
    # group is the largest number of held query heads sharing one KV head.
    assert shard.group == max(sum(1 for h in q if h // g == k) for k in kv)
    for j in range(shard.num_kv):
        block = shard.q_slots[j * shard.group : (j + 1) * shard.group]
        assert any(h is not None for h in block)  # every held KV head is read by some slot
        for h in block:
            if h is not None:
                assert h // g == kv.start + j
    assert shard.padded == (len(real) < shard.num_slots)


@pytest.mark.parametrize("num_heads", range(1, MAX_HEADS + 1))
def test_head_shards_exhaustive(num_heads):
    checked = 0
    for num_kv in divisors(num_heads):
        g = num_heads // num_kv
        for tp in range(1, num_heads + 1):
            shards = [head_shard(num_heads, num_kv, tp, r) for r in range(tp)]
            # The query spans partition range(H) exactly and contiguously, in rank order.
            flat = [h for s in shards for h in s.q_heads]
            assert flat == list(range(num_heads))
            for a, b in zip(shards, shards[1:]):
                assert a.q_heads.stop == b.q_heads.start
            # Every KV head is held by at least one rank.
            assert set().union(*(set(s.kv_heads) for s in shards)) == set(range(num_kv))
            for s in shards:
                check_shard(s, num_heads, num_kv, tp)
                # slot_segments covers the same rows as the slots, for several head sizes.
                for d in (1, 3, 8):
                    segs = slot_segments(s, d)
                    expected = [None if h is None else h * d + i for h in s.q_slots for i in range(d)]
                    assert expand_segments(segs, d) == expected
                    for seg in segs:
                        if seg is not None:
                            assert seg.step == 1 and seg.start % d == 0 and len(seg) % d == 0 and len(seg) > 0
                    # Adjacent real heads are merged into one span.
                    for a, b in zip(segs, segs[1:]):
                        if a is not None and b is not None:
                            assert a.stop != b.start
                checked += 1
            # With tp == 1 one rank holds everything and needs no padding.
            if tp == 1:
                (only,) = shards
                assert only.q_heads == range(num_heads)
                assert only.kv_heads == range(num_kv)
                assert only.group == g
                assert only.q_slots == tuple(range(num_heads))
                assert not only.padded
    assert checked == len(divisors(num_heads)) * num_heads * (num_heads + 1) // 2


def test_hand_written_9_heads_3_kv_on_2_ranks():
    r0 = head_shard(9, 3, 2, 0)
    assert r0.q_heads == range(0, 5)
    assert r0.kv_heads == range(0, 2)
    assert r0.group == 3
    assert r0.q_slots == (0, 1, 2, 3, 4, None)
    assert r0.padded and r0.num_slots == 6 and r0.num_kv == 2
    r1 = head_shard(9, 3, 2, 1)
    assert r1.q_heads == range(5, 9)
    assert r1.kv_heads == range(1, 3)
    assert r1.group == 3
    assert r1.q_slots == (5, None, None, 6, 7, 8)
    assert slot_segments(r0, 4) == [range(0, 20), None]
    assert slot_segments(r1, 4) == [range(20, 24), None, None, range(24, 36)]


def test_hand_written_mqa_replicates_the_kv_head():
    for r in range(4):
        s = head_shard(4, 1, 4, r)
        assert s.q_heads == range(r, r + 1)
        assert s.kv_heads == range(0, 1)
        assert s.q_slots == (r,)
        assert not s.padded


def test_hand_written_6_heads_2_kv_on_4_ranks():
    shards = [head_shard(6, 2, 4, r) for r in range(4)]
    assert [s.q_heads for s in shards] == [range(0, 2), range(2, 4), range(4, 5), range(5, 6)]
    assert [s.kv_heads for s in shards] == [range(0, 1), range(0, 2), range(1, 2), range(1, 2)]
    assert [s.q_slots for s in shards] == [(0, 1), (2, 3), (4,), (5,)]
    assert [s.group for s in shards] == [2, 1, 1, 1]
    # rank 1 straddles the KV group boundary: heads 2 and 3 read KV heads 0 and 1.
    assert slot_segments(shards[1], 2) == [range(4, 8)]


def test_hand_written_even_split_uneven():
    assert even_splits(9, 2) == [range(0, 5), range(5, 9)]
    assert even_splits(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert even_splits(2, 4) == [range(0, 1), range(1, 2), range(2, 2), range(2, 2)]
    assert vocab_shard(301, 4, 0) == range(0, 76)
    assert vocab_shard(301, 4, 3) == range(226, 301)


@pytest.mark.parametrize("n", list(range(0, 41)) + [97, 128, 301, 49152, 151936])
def test_even_splits_cover(n):
    for parts in range(1, 19):
        spans = even_splits(n, parts)
        assert len(spans) == parts
        assert [i for s in spans for i in s] == list(range(n))
        extra = n % parts
        for i, s in enumerate(spans):
            assert s == even_split(n, parts, i)
            assert s.step == 1
            assert len(s) == n // parts + (1 if i < extra else 0)
            assert len(s) <= padded_shard_size(n, parts)
            assert vocab_shard(n, parts, i) == s
        assert max(len(s) for s in spans) - min(len(s) for s in spans) <= 1
        assert padded_shard_size(n, parts) == max(len(s) for s in spans)


@pytest.mark.parametrize(
    "n, parts, index",
    [(10, 0, 0), (10, -1, 0), (10, 2, 2), (10, 2, -1), (-1, 2, 0)],
)
def test_even_split_rejects_bad_arguments(n, parts, index):
    with pytest.raises(ValueError):
        even_split(n, parts, index)


@pytest.mark.parametrize("num_heads", [1, 4, 9, 32])
def test_check_degree_accepts_the_valid_range(num_heads):
    assert list(valid_degrees(num_heads)) == list(range(1, num_heads + 1))
    for tp in range(1, num_heads + 1):
        assert check_degree(tp, num_heads) is None


@pytest.mark.parametrize("num_heads", [1, 4, 9, 32])
def test_check_degree_rejects_with_the_valid_range(num_heads):
    for bad in (0, num_heads + 1, -1, -num_heads, 2 * num_heads + 3, 2.0, 1.5, "2", None, True):
        with pytest.raises(ValueError) as e:
            check_degree(bad, num_heads)
        msg = str(e.value)
        assert f"1 to {num_heads}" in msg
        assert repr(bad) in msg


def test_head_shard_rejects_bad_degree():
    with pytest.raises(ValueError, match="1 to 9"):
        head_shard(9, 3, 10, 0)
    with pytest.raises(ValueError, match="1 to 9"):
        head_shard(9, 3, 0, 0)


@pytest.mark.parametrize("num_heads, num_kv", [(9, 2), (6, 4), (32, 5), (4, 8), (6, 0), (6, -3)])
def test_head_shard_rejects_heads_not_divisible_by_kv(num_heads, num_kv):
    with pytest.raises(ValueError, match="multiple of the KV head count"):
        head_shard(num_heads, num_kv, 1, 0)


def test_head_rows():
    assert head_rows(range(2, 5), 64) == range(128, 320)
    assert head_rows(range(0, 1), 8) == range(0, 8)
    assert head_rows(range(3, 3), 8) == range(24, 24)
