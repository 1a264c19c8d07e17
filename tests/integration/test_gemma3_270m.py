"""The real Gemma 3 270M GGUF (Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0 blocks dequantized per slice; 4 query
heads, 1 KV head replicated on every rank, head_dim 256, vocabulary 262144, local layers with a
window of 512): greedy tokens at TP 1, 2, 3 and 4 equal transformers' (float32, the same file)
for 24 tokens on three prompts, and on a prompt in Gemma's chat format; with speculative decoding
too (tp=1 and tp=3: the model as its own draft at tp=1, every draft accepted; tp=2: n-gram drafts;
tp=4 without)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli, greedy_reference

from tensorpar import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
NEW_TOKENS = 24

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def reference(gemma3_gguf):
    """transformers on the same GGUF: its model, prompt ids and greedy continuations."""
    return greedy_reference(gemma3_gguf, PROMPTS, NEW_TOKENS)


NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
SELF = {"model": "gemma3-270m", "num_speculative_tokens": 3, "draft_tensor_parallel_size": 1}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp, speculative", [(1, SELF), (2, NGRAM), (3, SELF), (4, None)])
def test_greedy_tokens_match_transformers(tp, speculative, reference, rank_pool):
    _, ref = reference
    with LLM("gemma3-270m", tp=tp, progress=False, ranks=rank_pool(tp), speculative_config=speculative) as llm:
        assert llm.config.architecture == "gemma3_text" and llm.config.num_kv_heads == 1
        result = llm.generate_full(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    for c, (ref_prompt, ref_tokens) in zip(result.completions, ref):
        assert c.prompt_token_ids == ref_prompt
        assert c.token_ids == ref_tokens
    assert result.completions[0].text.startswith(" the capital of the country of France.")
    assert len(result.peak_rss_mb) == tp
    if speculative is not None:
        assert result.speculation["accepted_tokens"] > 0
    if speculative is SELF:
        assert result.speculation["acceptance_rate"] == 1.0


@pytest.mark.timeout(300)
def test_chat_uses_gemma_turns_and_matches_transformers(reference):
    model, _ = reference
    r = cli("generate", "--model", "gemma3-270m", "--tp", "2", "--chat", "--json", "--max-new-tokens", "12",
            "--ignore-eos", "--prompt", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ids = out["prompt_token_ids"]
    # <bos> <start_of_turn> user \n ... <end_of_turn> \n <start_of_turn> model \n
    assert ids[:4] == [2, 105, 2364, 107] and ids[-5:] == [106, 107, 105, 4368, 107]
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out["token_ids"] == gen[0, len(ids):].tolist()
