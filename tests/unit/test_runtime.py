"""The runtime's parts without processes: the parallel layout, dtype names, step messages, attention
batches, the per-sequence rules, the input checks, and the scheduler driven by hand-made outcomes, and the sampler."""

from __future__ import annotations

import pytest
import torch

from tensorpar.distributed.dims import ParallelDims
from tensorpar.dtypes import engine_dtype, short_name, torch_dtype
from tensorpar.errors import TensorparError
from tensorpar.layers.attention import ALL_KEYS, BY_POSITION, CAUSAL, AttentionBatch
from tensorpar.runtime import messages
from tensorpar.runtime.inputs import ContextLengthError, InputProcessor
from tensorpar.runtime.kv_cache import KVCache
from tensorpar.runtime.request import Collector, Request, requests_for
from tensorpar.runtime.sampling import SamplingParams
from tensorpar.runtime.scheduler import DECODE, PREFILL, SCORE, Scheduler
from tensorpar.runtime.sequence import Detokenizer, Sequence

from helpers import run_until_idle, step


@pytest.fixture(scope="module")
def tokenizer():
    from tensorpar.loading import open_source

    return open_source("smollm2-135m").tokenizer()


# ---------------------------------------------------------------- layout and dtypes


def test_parallel_dims_resolve_once_with_one_clear_error_each():
    assert ParallelDims.resolve(9).tp == 1
    assert ParallelDims.resolve(9, 4).world_size == 4
    assert ParallelDims.resolve(9, None, torchrun_world_size=3).tp == 3  # no flag: torchrun's size
    assert ParallelDims.resolve(6, None, dp=2, torchrun_world_size=4, supported=("tp", "dp")) == ParallelDims(2, dp=2)
    with pytest.raises(TensorparError, match="tensor-parallel degree 10 is not valid .* from 1 to 9"):
        ParallelDims.resolve(9, 10)
    with pytest.raises(TensorparError, match="--tp 1 does not match torchrun's world size 2"):
        ParallelDims.resolve(9, 1, torchrun_world_size=2)  # an explicit 1 is not "whatever torchrun says"
    with pytest.raises(TensorparError, match="--tp must be a positive integer, got 0"):
        ParallelDims.resolve(9, 0)
    with pytest.raises(TensorparError, match="--dp 2 is not supported"):
        ParallelDims.resolve(9, 1, dp=2)


def test_every_dtype_alias_is_accepted_everywhere():
    for names, short in ((("fp32", "float32", "FP32", "f32"), "fp32"), (("bf16", "bfloat16"), "bf16"),
                         (("fp16", "float16", "half"), "fp16")):
        for name in names:
            assert short_name(name) == short and engine_dtype(name) == short
    assert engine_dtype("auto", "cpu") == "fp32" and engine_dtype("auto", "cuda:0") == "bf16"
    assert torch_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; choose one of: fp32 .* or auto"):
        engine_dtype("fp8")  # a planner dtype, not one weights load as


# ---------------------------------------------------------------- step messages and attention batches


def test_messages_carry_what_the_ranks_need_in_the_header_and_part_table():
    m = messages.step([messages.chunk([5, 6, 7], 0, 3, [4, 9], block_size=2)], in_use=10)  # 3 positions: 2 blocks of 2
    assert m.header() == [messages.STEP, 1, 2, 3, 2 * 0, messages.FULL, 10, 0]
    assert m.payload() == [1, 3, 3, 2, 2, CAUSAL, messages.LAST] + [5, 6, 7, 0, 1, 2, 4, 9]
    m = messages.step([messages.decode_part([9, 8], [6, 6], [[2, 3], [4, 5]], 4)], messages.GREEDY)  # equal lengths
    assert m.parts[0].table() == [2, 1, 7, 6, 2, ALL_KEYS, messages.LAST] and m.logits == messages.GREEDY
    m = messages.step([messages.decode_part([9, 8, 7], [6, 3, 4], [[5, 6], [1], [2, 3]], 4)])  # mixed lengths
    assert m.parts[0].table()[2:] == [7, 6, 2, BY_POSITION, messages.LAST]
    assert m.parts[0].blocks == ((5, 6), (1, 0), (2, 3))  # a shorter row's table padded with block 0
    assert messages.allocate(8, 16).header()[:5] == [messages.ALLOC, 0, 8, 0, 16]
    later = messages.chunk([1, 2, 3, 4, 5], 2, 4, [6, 7, 8], 2)  # tokens 2:4 after 0:2 are cached
    assert later.table() == [1, 2, 4, 3, 2, BY_POSITION, messages.LAST] and later.ids == ((3, 4),) and later.blocks == ((6, 7),)
    mixed = messages.step([messages.decode_part([9, 8], [6, 3], [[0, 3, 4, 5], [1, 2]], 2), messages.chunk([1, 2, 3], 0, 3, [7, 9], 2),
                    later])
    for message in (messages.step([messages.chunk([1, 2], 0, 2, [1], 2)]), messages.step([messages.decode_part([3, 4], [5, 2], [[1, 2, 3], [4, 5]], 2)]),
                    messages.score([7, 8, 9]), mixed):
        header = message.header()
        payload = torch.tensor(message.payload())
        assert len(payload) == messages.Message.payload_size(header)
        batch = messages.to_batch(header, payload)
        mine = messages.to_batch(header, payload, table=message.table())  # the leader's: its own lists
        assert message.table() == payload[: messages.PART_SIZE * len(message.parts)].view(-1, 7).tolist()
        assert torch.equal(mine.ids, batch.ids) and len(mine.parts) == len(batch.parts)
        assert len(batch.parts) == len(message.parts)
        for part, sent in zip(batch.parts, message.parts):
            assert part.positions.tolist() == [list(r) for r in sent.positions]
            assert part.max_position == max(max(r) for r in sent.positions) and part.kind == sent.kind
            assert part.kv_len == (sent.kv_len if message.op == messages.STEP else 0)
            assert (part.blocks.tolist() if message.op == messages.STEP else []) == [list(t) for t in sent.blocks]
        flat = [t for row in message.ids for t in row]
        assert batch.ids.flatten().tolist() == flat
    batch = messages.to_batch(mixed.header(), torch.tensor(mixed.payload()))
    assert batch.ids.shape == (1, 7) and batch.attention.positions.tolist() == [[6, 3, 0, 1, 2, 2, 3]]
    assert batch.attention.last.tolist() == [0, 1, 4, 6]  # each row's last token: 2 decodes, 2 prompts
    x = torch.arange(7.0).view(1, 7, 1)
    assert batch.attention.unpack(1, x).shape == (1, 3, 1) and batch.attention.unpack(0, x).flatten().tolist() == [0, 1]
    assert batch.output_tokens(x).flatten().tolist() == [0, 1, 4, 6]
    # speculative verification: every token of a part of drafts gives logits, packed or alone
    verify = messages.chunk([1, 2, 3, 4, 5], 2, 5, [6, 7, 8], 2, outputs=messages.EVERY)
    assert verify.output_rows == 3 and verify.table()[-1] == messages.EVERY
    drafts = messages.step([messages.decode_part([9, 8], [6, 3], [[0, 3, 4, 5], [1, 2]], 2), verify], messages.GREEDY,
                           model=messages.DRAFT)
    assert drafts.header()[7] == messages.DRAFT
    batch = messages.to_batch(drafts.header(), torch.tensor(drafts.payload()))
    assert batch.model == messages.DRAFT and batch.outputs.tolist() == [0, 1, 2, 3, 4]
    alone = messages.step([verify])
    batch = messages.to_batch(alone.header(), torch.tensor(alone.payload()))
    assert batch.output_tokens(torch.arange(3.0).view(1, 3, 1)).flatten().tolist() == [0, 1, 2]


def _visible(mask, causal, S_, L):
    if mask is not None:
        return mask[:, 0]
    return torch.ones(S_, L, dtype=torch.bool).tril(L - S_) if causal else torch.ones(S_, L, dtype=torch.bool)


def test_attention_masks_follow_positions_and_windows():
    fresh = AttentionBatch.fresh(2, 6, torch.device("cpu"))
    assert fresh.mask() == (None, True)
    mask, causal = fresh.mask(window=3)  # keys reach further back than the window: explicit
    q, k = torch.arange(6).view(-1, 1), torch.arange(6).view(1, -1)
    assert not causal and torch.equal(mask[0, 0], (k <= q) & (k > q - 3))
    decode = AttentionBatch(torch.tensor([[4], [4]]), ALL_KEYS, 4, kv_len=5, blocks=torch.tensor([[1], [2]]))
    assert decode.mask() == (None, False) and decode.mask(window=5) == (None, False)
    assert torch.equal(decode.mask(window=2)[0][:, 0, 0], torch.tensor([[False, False, False, True, True]] * 2))
    mixed = AttentionBatch(torch.tensor([[4], [1]]), BY_POSITION, 4, kv_len=5, blocks=torch.tensor([[3], [1]]))
    assert torch.equal(mixed.mask()[0][:, 0, 0], torch.tensor([[True] * 5, [True, True, False, False, False]]))


def test_keys_values_write_the_new_tokens_into_their_blocks_then_read_each_rows_prefix():
    cache = KVCache([(2, 4)], num_blocks=6, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    cache.zero_through(6)
    past = torch.randn(6, 4, 2, 4)
    cache.k[0].copy_(past)
    k, v = torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4)
    # row 0: positions 0..5 in blocks [3, 5] (the new token at 5: block 5, offset 1); row 1: position 2 in block [1]
    batch = AttentionBatch(torch.tensor([[5], [2]]), BY_POSITION, 5, kv_len=6, blocks=torch.tensor([[3, 5], [1, 0]]))
    keys, values = batch.keys_values(k, v, cache.layer(0))
    assert keys.shape == values.shape == (2, 2, 6, 4)
    assert torch.equal(cache.k[0][5, 1], k[0, 0]) and torch.equal(cache.v[0][1, 2], v[1, 0])
    assert torch.equal(keys[0, :, :4], past[3].transpose(0, 1))  # the first block as it was
    assert torch.equal(keys[0, :, 4], past[5, 0]) and torch.equal(keys[0, :, 5], k[0, 0])
    assert torch.equal(keys[1, :, :2], past[1, :2].transpose(0, 1)) and torch.equal(keys[1, :, 2], k[1, 0])
    untouched = [b for b in range(6) if b not in (1, 5)]
    assert torch.equal(cache.k[0][untouched], past[untouched])


def test_a_cache_zeroes_each_block_the_first_time_it_is_used_and_never_again():
    cache = KVCache([(1, 2)], num_blocks=4, block_size=2, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.count_nonzero(cache.k[0][0]) == 0 and cache.zeroed == 1  # the padding block
    cache.k[0][1:].fill_(float("nan"))
    cache.zero_through(3)
    assert torch.count_nonzero(cache.k[0][1:3]) == 0 and torch.isnan(cache.k[0][3]).all()
    cache.k[0][1].fill_(7.0)
    cache.zero_through(2)  # (block 1 holds a sequence's keys now: left alone)
    assert (cache.k[0][1] == 7).all()


# ---------------------------------------------------------------- a sequence's rules


def run(tokenizer, ids, max_model_len=4096, **params) -> tuple[list, Sequence]:
    """Feed ``ids`` to a sequence after a fixed prompt until a rule ends it; its events and itself."""
    events = []
    prompt = tokenizer("Once upon a time")["input_ids"]
    seq = Sequence(Request("r", prompt, SamplingParams(**params)), events.append, tokenizer, {2}, max_model_len)
    for t in ids:
        seq.append(t)
        if seq.finish_reason:
            break
    return events, seq


def test_text_deltas_add_up_to_the_decoded_text(tokenizer):
    ids = tokenizer(" there was a café 🎉 in 東京, run by a fox.")["input_ids"]
    events, seq = run(tokenizer, ids, max_new_tokens=len(ids))
    assert seq.finish_reason == "length" and len(events) == len(ids)
    assert "".join(e.text_delta for e in events) == tokenizer.decode(ids, skip_special_tokens=True)
    # the emoji's bytes span several tokens: the pieces before it are held back until it is whole
    assert all("\ufffd" not in e.text_delta for e in events)


def test_an_unfinished_character_at_the_end_is_decoded_as_it_stands(tokenizer):
    ids = tokenizer(" 🎉")["input_ids"]
    assert len(ids) > 1
    events, seq = run(tokenizer, ids[:-1], max_new_tokens=len(ids) - 1)
    assert "".join(e.text_delta for e in events) == tokenizer.decode(ids[:-1], skip_special_tokens=True)


def test_stop_strings_cut_the_text_and_are_held_back_until_they_cannot_begin(tokenizer):
    ids = tokenizer(" the quick brown fox jumps over the lazy dog")["input_ids"]
    events, seq = run(tokenizer, ids, max_new_tokens=50, stop=("fox jumps", "zebra"))
    text = "".join(e.text_delta for e in events)
    assert seq.finish_reason == "stop" and text == " the quick brown "
    streamed = ""
    for i, e in enumerate(events[:-1]):  # while running: all but the last 8 characters (len("fox jumps") - 1)
        streamed += e.text_delta
        decoded = tokenizer.decode(ids[: i + 1])
        assert streamed == decoded[: max(0, len(decoded) - 8)]


def test_include_stop_str_in_output_keeps_the_stop_string(tokenizer):
    ids = tokenizer(" the quick brown fox jumps over the lazy dog")["input_ids"]
    events, seq = run(tokenizer, ids, max_new_tokens=50, stop=("fox jumps", "zebra"), include_stop_str_in_output=True)
    assert seq.finish_reason == "stop" and "".join(e.text_delta for e in events) == " the quick brown fox jumps"


def test_eos_and_the_context_limit_end_a_sequence(tokenizer):
    events, seq = run(tokenizer, [100, 2, 101], max_new_tokens=10)
    assert seq.finish_reason == "stop" and seq.out == [100, 2]
    events, seq = run(tokenizer, [100, 2, 101], max_new_tokens=10, ignore_eos=True)
    assert seq.finish_reason is None and seq.out == [100, 2, 101]
    prompt_len = len(tokenizer("Once upon a time")["input_ids"])
    events, seq = run(tokenizer, [100] * 10, max_new_tokens=10, max_model_len=prompt_len + 3)
    assert seq.finish_reason == "length" and len(seq.out) == 3


def test_detokenizer_flush_matches_decode_for_special_and_partial_tokens(tokenizer):
    d = Detokenizer(tokenizer)
    ids = [1, 504, 2] + tokenizer("é🎉")["input_ids"][:-1]
    text = "".join(d.step(t) for t in ids) + d.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_choices_get_consecutive_seeds():
    reqs = requests_for("x", [1, 2], SamplingParams(temperature=0.7, seed=10, n=3))
    assert [r.request_id for r in reqs] == ["x-0", "x-1", "x-2"]
    assert [r.params.seed for r in reqs] == [10, 11, 12] and all(r.params.n == 1 for r in reqs)
    assert [r.params.seed for r in requests_for("y", [1], SamplingParams(n=2))] == [None, None]


# ---------------------------------------------------------------- input checks


def test_inputs_encode_and_check_like_every_front_end(tokenizer):
    inputs = InputProcessor(tokenizer, 49152, max_model_len=32)
    assert inputs.encode("Hello there") == tokenizer("Hello there")["input_ids"]
    assert inputs.encode([5, 6]) == [5, 6]
    chat = inputs.encode("Hi", chat=True)
    assert chat == list(tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                      add_generation_prompt=True, tokenize=True, return_dict=False))
    with pytest.raises(ValueError, match="empty prompt"):
        inputs.encode("")
    with pytest.raises(ValueError, match=r"token ids out of range \[0, 49152\): \[49152\]"):
        inputs.encode([1, 49152])
    inputs.check_length(30, 2)
    with pytest.raises(ContextLengthError) as e:
        inputs.check_length(30, 3)
    assert (e.value.limit, e.value.prompt, e.value.asked) == (32, 30, 3) and "33" in str(e.value)
    with pytest.raises(ContextLengthError, match="no room"):
        inputs.check_length(32, None)
    with pytest.raises(ValueError, match="ships no tokenizer"):
        InputProcessor(None, 10, 8, "m").encode("text")


# ---------------------------------------------------------------- the scheduler


def _steps(plans):
    """The model-step messages of ``plans``."""
    return [p.message for p in plans if p.message.op == messages.STEP]


def test_scheduler_queues_beyond_its_slots_and_each_request_gets_its_own_tokens():
    sched = Scheduler(None, set(), max_num_seqs=2, max_model_len=64)
    assert sched.reserve(2, 64) == 2 * 64 // 16 + 1  # blocks for the ranks' cache (block 0 pads)
    assert sched.reserve(2, 64) is None  # room already
    collect = Collector()
    reqs = [Request(f"r{i}", [i], SamplingParams(max_new_tokens=3 + i, logprobs=1 if i == 2 else 0))
            for i in range(4)]
    for r in reqs:
        sched.add(r, collect)
    first = step(sched)
    assert sched.stats()["running"] == 2 and sched.stats()["waiting"] == 2
    plans = [first] + run_until_idle(sched)
    for i, r in enumerate(reqs):
        c = collect.completion(r, 0, i)
        assert c.token_ids == [(i + k) % 50 for k in range(1, 4 + i)] and c.finish_reason == "length"
    steps = _steps(plans)
    assert max(len(m.ids) for m in steps) == 2  # never more than the slots
    assert {m.logits for m in steps if any(row[-1] in (2, 3, 4) for row in m.ids)} >= {messages.FULL}  # top-1 asked
    assert len(steps[0].parts) == 2 and steps[0].ids == [(0,), (1,)]  # both prompts in one step
    assert steps[0].logits == messages.GREEDY  # (neither asks for log-probabilities)
    assert [p.kind for p in plans[:2]] == [PREFILL, DECODE]


def _run_all(sched, collect, reqs):
    for r in reqs:
        sched.add(r, collect)
    plans = run_until_idle(sched)
    return [collect.completion(r, 0, i) for i, r in enumerate(reqs)], plans


def test_chunked_prefill_runs_a_long_prompt_beside_the_decodes_within_the_token_budget():
    sched = Scheduler(None, set(), max_num_seqs=4, max_model_len=128, max_num_batched_tokens=8)
    sched.reserve(4, 128)
    collect = Collector()
    short = Request("s", [7], SamplingParams(max_new_tokens=12))
    sched.add(short, collect)
    plans = [step(sched)]  # the short prompt alone: its first token
    long = Request("l", list(range(30)), SamplingParams(max_new_tokens=3))
    sched.add(long, collect)
    plans += run_until_idle(sched)
    steps = _steps(plans)
    assert all(sum(len(row) for row in m.ids) <= 8 for m in steps)  # the budget
    chunks = [p for m in steps for p in m.parts if p.blocks and len(p.ids[0]) > 1]
    assert [(p.positions[0][0], p.positions[0][-1], p.kv_len) for p in chunks] == [(0, 6, 7), (7, 13, 14),
                                                                                  (14, 20, 21), (21, 27, 28), (28, 29, 30)]
    assert chunks[0].kind == CAUSAL and all(p.kind == BY_POSITION for p in chunks[1:])
    # every step while the long prompt was prefilled also decoded the short sequence
    assert all(len(m.parts) == 2 and len(m.parts[0].ids[0]) == 1 for m in steps[1:6])
    assert [p.rows[1] for p in plans[1:5]] == [None] * 4  # chunks before the last yield no token
    assert collect.completion(short, 0, 0).token_ids == [(7 + k) % 50 for k in range(1, 13)]
    assert collect.completion(long, 0, 1).token_ids == [30, 31, 32]  # after its last prompt token (29)


def test_without_chunking_prompts_run_whole_and_packed():
    sched = Scheduler(None, set(), max_num_seqs=4, max_model_len=128, max_num_batched_tokens=8,
                      chunked_prefill=False)
    sched.reserve(4, 128)
    reqs = [Request(f"r{i}", list(range(n)), SamplingParams(max_new_tokens=2)) for i, n in enumerate((3, 4, 20))]
    done, plans = _run_all(sched, Collector(), reqs)
    assert [c.token_ids for c in done] == [[3, 4], [4, 5], [20, 21]]
    steps = _steps(plans)
    assert steps[0].ids == [(0, 1, 2), (0, 1, 2, 3), tuple(range(20))]  # all three packed, each whole
    assert sched.whole_budget == 128 + 4  # unchunked, the budget holds a whole context beside the decodes


def test_with_nothing_decoding_a_long_prompt_runs_whole():
    sched = Scheduler(None, set(), max_num_seqs=4, max_model_len=128, max_num_batched_tokens=8)
    sched.reserve(4, 128)
    done, plans = _run_all(sched, Collector(), [Request("l", list(range(30)), SamplingParams(max_new_tokens=2))])
    assert done[0].token_ids == [30, 31]
    assert plans[0].message.ids == [tuple(range(30))]  # one step, whole


def test_scheduler_aborts_waiting_and_running_requests_and_refuses_after_close():
    sched = Scheduler(None, set(), max_num_seqs=1, max_model_len=64)
    sched.reserve(1, 64)
    collect = Collector()
    sched.add(Request("a", [1], SamplingParams(max_new_tokens=50)), collect)
    sched.add(Request("b", [1], SamplingParams(max_new_tokens=50)), collect)
    step(sched)
    sched.abort("a")
    sched.abort("b")
    assert step(sched) is None  # both gone: nothing to run
    assert collect.finish["a"].finish_reason == "abort" and collect.finish["b"].finish_reason == "abort"
    assert "b" not in collect.tokens and not sched.has_work() and sched.blocks.used == 0
    sched.close("error", "rank 1 of 2 failed")
    sched.add(Request("c", [1], SamplingParams()), collect)
    assert collect.finish["c"].finish_reason == "error" and collect.finish["c"].error == "rank 1 of 2 failed"


def test_prompts_to_score_come_first_as_plans_of_their_own_within_the_budget():
    sched = Scheduler(None, set(), max_num_seqs=4, max_model_len=64, max_num_batched_tokens=8)
    sched.reserve(4, 64)
    collect = Collector()
    scored = [Request(f"s{i}", [1, 2, 3, 4, 5], SamplingParams(max_new_tokens=0 if i == 0 else 2, prompt_logprobs=1))
              for i in range(3)]
    for r in scored:
        sched.add(r, collect)
    plans = run_until_idle(sched)
    # 8 tokens of budget: two 5-token prompts scored (the second starts under budget), then a model step
    assert [p.kind for p in plans[:4]] == [SCORE, SCORE, PREFILL, SCORE]
    assert [p.scoring[0].request_id for p in plans if p.kind == SCORE] == ["s0", "s1", "s2"]
    assert plans[0].message.op == messages.SCORE and plans[0].message.ids == [(1, 2, 3, 4, 5)]
    assert collect.finish["s0"].finish_reason == "length" and "s0" not in collect.tokens  # scored, nothing more
    assert collect.prompts["s1"][1] == (2, 0.0, [])
    assert collect.completion(scored[2], 0, 2).token_ids == [6, 7]


def test_the_sampler_reports_the_models_own_log_probabilities_and_applies_controls_per_row():
    from tensorpar.runtime.sampler import Sampler
    from tensorpar.runtime.scheduler import StepPlan
    from tensorpar.runtime.sequence import Sequence

    def seq(rid, **params):
        return Sequence(Request(rid, [1, 2], SamplingParams(**params)), lambda e: None, None, {9}, 64)

    logits = torch.tensor([[0.0, 2.0, 1.0, 0.0], [3.0, 0.0, 0.0, 2.5], [0.0, 0.0, 0.0, 0.0]])
    rows = [seq("a", logprobs=2), seq("b", logit_bias=((3, 1.0),)), None]
    plan = StepPlan(PREFILL, messages.step([]), rows)
    a, b, none = Sampler({9}).choose(messages.StepOutput(logits=logits), plan)
    norm = torch.logsumexp(logits, dim=-1)
    assert a.token == 1 and a.logprob == pytest.approx(2.0 - norm[0].item())
    assert [t for t, _ in a.top] == [1, 2] and a.top[1][1] == pytest.approx(1.0 - norm[0].item())
    assert b.token == 3  # the bias moved the choice ...
    assert b.logprob == pytest.approx(2.5 - norm[1].item()) and b.top == []  # ... not the reported log-probability
    assert none is None
    greedy = Sampler(set()).choose(messages.StepOutput(ids=torch.tensor([4, 5, 6]), logprobs=torch.tensor([-0.5, -1.0, 0.0])),
                                   plan)
    assert [(c.token, c.logprob) for c in greedy[:2]] == [(4, -0.5), (5, -1.0)] and greedy[2] is None


def test_sizes_and_the_weights_one_rank_holds():
    from tensorpar.distributed.dims import ParallelDims
    from tensorpar.loading.open import open_source
    from tensorpar.runtime.memory_guard import parse_size, weight_bytes_per_rank

    assert parse_size("8GiB") == 8 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size("1e3") == 1000
    for bad in ("", "12 parsecs", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    source = open_source("smollm2-135m")  # 134.5M parameters, the LM head tied to the embedding
    one = weight_bytes_per_rank(source, ParallelDims(tp=1), 4, "none", 32)
    assert 134e6 * 4 < one < 136e6 * 4
    three = weight_bytes_per_rank(source, ParallelDims(tp=3), 4, "none", 32)
    assert one / 3 < three < one / 3 * 1.01  # 9 heads, 3 KV heads: an even split
    int8 = weight_bytes_per_rank(source, ParallelDims(tp=1), 4, "int8", 32)  # the 28.3M-entry embedding in float32
    assert 28.3e6 * 4 + 106e6 < int8 < 28.4e6 * 4 + 107e6


def test_kv_budgets_are_fractions_or_bytes(monkeypatch):
    import psutil

    from tensorpar.runtime.memory_guard import kv_cache_bytes, parse_budget

    assert parse_budget("0.5") == 0.5 and parse_budget("1") == 1.0 and isinstance(parse_budget("1"), float)
    assert parse_budget("2GiB") == 2 * 2**30 and parse_budget("4096") == 4096
    for bad in ("0", "-0.5", "half", ""):
        with pytest.raises(ValueError, match="not a KV budget"):
            parse_budget(bad)

    class Memory:
        available = 8 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory)
    assert kv_cache_bytes(0.5, ranks_here=2, device="cpu") == 2 * 2**30  # half of each rank's share
    assert kv_cache_bytes(12345, ranks_here=2, device="cpu") == 12345


def test_vllm_flag_names_are_aliases():
    from tensorpar.cli.main import build_parser

    a = build_parser().parse_args(["serve", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                                   "--data-parallel-size", "3", "--max-model-len", "512", "--max-num-seqs", "4"])
    assert (a.tp, a.pp, a.dp, a.max_model_len, a.max_num_seqs) == (2, 2, 3, 512, 4)
    a = build_parser().parse_args(["generate", "-tp", "3", "-pp", "1", "--prompt", "x"])
    assert (a.tp, a.pp) == (3, 1)
