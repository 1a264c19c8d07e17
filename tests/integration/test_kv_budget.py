"""A KV budget smaller than the batch needs: sequences are admitted by free blocks, the newest
are preempted as the older ones grow, and every completion equals the one an unbounded cache
gives (greedy, tp=2, real ranks)."""

from __future__ import annotations

import pytest

from tensorpar import LLM, SamplingParams

PROMPTS = ["Once upon a time", "Tensor parallelism", "Hello there", "The capital of France is", "def f(x):",
           "A B C", "One two three four", "Why?"]


@pytest.mark.timeout(240)
def test_a_tight_kv_budget_preempts_and_still_gives_every_completion_unchanged(tiny_chat_checkpoint):
    sp = SamplingParams(max_new_tokens=40, ignore_eos=True)
    options = dict(tp=2, progress=False, max_model_len=64, block_size=4)
    with LLM(str(tiny_chat_checkpoint), **options) as llm:
        free = llm.generate_full(PROMPTS, sp)
    # the tiny model at tp=2: 2 layers x 1 KV head x 8 dims per rank, keys and values in fp32:
    # 512 bytes per block of 4; 25 blocks hold one 64-token sequence and 8 more positions
    with LLM(str(tiny_chat_checkpoint), kv_cache_memory=25 * 512, **options) as llm:
        tight = llm.generate_full(PROMPTS, sp)
    assert tight.cache["preemptions"] > 0 and free.cache["preemptions"] == 0
    for a, b in zip(free.completions, tight.completions):
        assert a.token_ids == b.token_ids and a.text == b.text and b.finish_reason == "length"
