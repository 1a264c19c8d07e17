"""The leader's KV-cache blocks: admission by free blocks, prefix caching by chained block hashes,
eviction of the least recently released cached blocks, and a scheduler that preempts the newest
sequence when a decoding one needs a block and none is left."""

from __future__ import annotations

import pytest

from tensorpar.runtime import messages
from tensorpar.runtime.block_manager import BlockManager
from tensorpar.runtime.request import Collector, Request
from tensorpar.runtime.sampling import SamplingParams
from tensorpar.runtime.scheduler import Scheduler

from helpers import run_until_idle


def test_blocks_come_free_first_then_fresh_and_the_padding_block_is_never_given():
    m = BlockManager(num_blocks=6, block_size=4)
    table, cached = m.admit(list(range(9)))  # 9 tokens: 3 blocks
    assert table == [1, 2, 3] and cached == [] and m.available == 2 and m.used == 3
    assert m.grow(table, 13) and table == [1, 2, 3, 4]
    assert not m.grow(table, 25) and table == [1, 2, 3, 4]  # 3 more needed, 1 left: nothing taken
    m.release(table)
    assert table == [] and m.used == 0 and m.free == [4, 3, 2, 1]  # unnamed blocks: free, the first last
    assert m.admit([7])[0] == [1]


def test_a_prompt_reuses_the_full_blocks_of_a_cached_prefix_and_computes_the_rest():
    m = BlockManager(num_blocks=10, block_size=4)
    system = list(range(100, 110))  # 10 tokens: 2 full blocks
    a = system + [1, 2, 3]
    table_a, _ = m.admit(a)
    hashes_a: list[int] = []
    m.register(table_a, hashes_a, a, computed=len(a))  # 13 positions: blocks 0..2 full
    assert len(hashes_a) == 3 and m.hits == 0 and m.queries == 13
    b = system + [9, 9]
    table_b, hashes_b = m.admit(b)
    assert table_b[:2] == table_a[:2] and hashes_b == hashes_a[:2]  # the shared prefix's two blocks
    assert table_b[2] not in table_a and m.hits == 8 and m.queries == 25
    assert m.refs[table_a[0]] == 2
    c = list(range(100, 108))  # exactly the first 2 blocks: its last token is still computed
    table_c, hashes_c = m.admit(c)
    assert hashes_c == hashes_a[:1] and table_c[0] == table_a[0] and table_c[1] != table_a[1]
    other = [5] + system[1:]  # the same tokens after a different first one: nothing shared
    assert m.admit(other)[1] == []


def test_released_named_blocks_stay_cached_until_evicted_least_recently_released_first():
    m = BlockManager(num_blocks=5, block_size=2)
    first, second = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    for tokens in (first, second):
        table, hashes = m.admit(tokens[:4] + [0])
        assert len(table) == 3 or tokens is second
        m.register(table, hashes, tokens, computed=4)
        m.release(table)
        if tokens is first:
            kept = dict(m.by_hash)
    assert m.available == 4 and len(m.cached) >= 2
    # the first prompt's blocks were released first: evicted first when fresh and free ones run out
    table, _ = m.admit([42] * 7)  # 4 blocks
    assert len(table) == 4 and not set(kept.values()) & set(m.by_hash.values())
    assert m.admit([1, 2, 3, 4, 5]) is None  # nothing left


def _steps(plans):
    return [p.message for p in plans if p.message.op == messages.STEP]


def test_sequences_sharing_a_prefix_compute_it_once_and_get_the_same_tokens():
    plans = []
    sched = Scheduler(None, set(), max_num_seqs=4, max_model_len=128, block_size=4)
    sched.reserve(4, 128)
    collect = Collector()
    system = [(7 * i) % 50 for i in range(21)]
    reqs = [Request(f"q{i}", system + [i], SamplingParams(max_new_tokens=3)) for i in range(3)]
    sched.add(reqs[0], collect)
    plans += run_until_idle(sched)
    for r in reqs[1:]:
        sched.add(r, collect)
    plans += run_until_idle(sched)
    computed = [p for m in _steps(plans) for p in m.parts if len(p.ids[0]) > 1]
    assert [p.positions[0][0] for p in computed] == [0, 20, 20]  # five cached blocks of 4 reused
    assert all(p.kv_len == 22 for p in computed)
    for i, r in enumerate(reqs):
        assert collect.completion(r, 0, i).token_ids == [(i + k) % 50 for k in range(1, 4)]
    stats = sched.stats()
    assert stats["prefix_cache_hits"] == 40 and stats["prefix_cache_queries"] == 66


def test_prefix_caching_off_computes_every_prompt_whole():
    plans = []
    sched = Scheduler(None, set(), max_num_seqs=4, max_model_len=128, block_size=4, prefix_caching=False)
    sched.reserve(4, 128)
    collect = Collector()
    for i in range(2):
        sched.add(Request(f"q{i}", list(range(21)), SamplingParams(max_new_tokens=2)), collect)
        plans += run_until_idle(sched)
    firsts = [p.positions[0][0] for m in _steps(plans) for p in m.parts if len(p.ids[0]) > 1]
    assert firsts == [0, 0] and sched.stats()["prefix_cache_hits"] == 0


def test_a_fixed_kv_budget_admits_by_free_blocks_and_preempts_the_newest_when_decodes_need_more():
    # 12 blocks of 4 positions: three 5-token prompts start at once (2 blocks each); as they grow
    # to 5 + 12 positions (5 blocks each) the pool runs out and the newest are preempted
    sched = Scheduler(None, set(), max_num_seqs=8, max_model_len=32, block_size=4, num_blocks=12)
    sched.reserve(8, 32)
    collect = Collector()
    reqs = [Request(f"r{i}", [i, i, i, i, i], SamplingParams(max_new_tokens=12)) for i in range(4)]
    for r in reqs:
        sched.add(r, collect)
    most = 0

    def check(plan):
        nonlocal most
        most = max(most, sched.stats()["running"])
        assert sched.blocks.used <= 12

    run_until_idle(sched, check)
    assert most == 4  # 4 x 2 blocks fit at first: admission by blocks, not by max_num_seqs
    assert sched.stats()["preemptions"] > 0
    for i, r in enumerate(reqs):  # preempted ones compute again and go on where they were
        assert collect.completion(r, 0, i).token_ids == [(i + k) % 50 for k in range(1, 13)]
    assert sched.blocks.used == 0


@pytest.mark.parametrize("caching", [False, True])
def test_a_preempted_sequence_computes_its_tokens_again_before_decoding_again(caching):
    plans = []
    sched = Scheduler(None, set(), max_num_seqs=2, max_model_len=16, block_size=4, num_blocks=5,
                      prefix_caching=caching)
    sched.reserve(2, 16)
    collect = Collector()
    a, b = (Request(r, p, SamplingParams(max_new_tokens=10)) for r, p in (("a", [1, 2, 3]), ("b", [4, 5, 6])))
    sched.add(a, collect)
    sched.add(b, collect)
    plans += run_until_idle(sched)
    assert sched.stats()["preemptions"] == 1
    parts = [p for m in _steps(plans) for p in m.parts]
    first_b = parts[0 + 1].blocks[0]  # b's block when it started: [4, 5, 6, 7] fills it
    # b (tokens 4..12 when preempted at 8 + 1 positions) computes its tokens again: all of them,
    # or with prefix caching only those after its two full blocks, in the very blocks it had
    again = [p for p in parts if p.ids[0][-1] == 12 and p.positions[0][-1] == 8]
    assert len(again) == 1
    if caching:
        assert again[0].ids == ((12,),) and again[0].blocks[0][0] == first_b[0]
    else:
        assert again[0].ids == (tuple(range(4, 13)),) and again[0].positions[0][0] == 0
    assert collect.completion(b, 0, 1).token_ids == [(6 + k) % 50 for k in range(1, 11)]
    assert collect.completion(a, 0, 0).token_ids == [(3 + k) % 50 for k in range(1, 11)]


def test_chains_from_different_roots_never_share_blocks():
    m = BlockManager(num_blocks=20, block_size=2)
    tokens = [1, 2, 3, 4, 5]

    def found(root=None) -> list[int]:
        """The cached blocks a new sequence of ``tokens`` would start with (given back at once)."""
        table, hashes = m.admit(tokens, root)
        cached = table[: len(hashes)]
        m.release(table)
        return cached

    table, hashes = m.admit(tokens)
    m.register(table, hashes, tokens, computed=4)
    assert found() == table[:2]  # the same rules: both full blocks found
    assert found("long") == []  # keys written under other rules: none
    long_table, long_hashes = m.admit(tokens, root="long")
    m.register(long_table, long_hashes, tokens, computed=4, root="long")
    assert found("long") == long_table[:2] and found() == table[:2]


def test_longrope_prompts_past_the_pretrained_length_share_blocks_only_with_each_other():
    plans = []
    sched = Scheduler(None, set(), max_num_seqs=4, max_model_len=64, block_size=4)
    sched.whole_prompts_from = 16  # (LongRoPE's pretrained length, as a Phi-3 config gives it)
    sched.reserve(4, 64)
    collect = Collector()
    words = [(3 * i) % 50 for i in range(24)]
    for i, prompt in enumerate((words[:12], words[:20], words[:20] + [7], words[:12] + [9])):
        sched.add(Request(f"r{i}", prompt, SamplingParams(max_new_tokens=1)), collect)
        plans += run_until_idle(sched)
    starts = [p.positions[0][0] for m in _steps(plans) for p in m.parts]
    # short: computed whole; long: none of the short one's blocks; long again: the long one's five;
    # short again: the first short one's three
    assert starts == [0, 0, 20, 12]
