"""The real SmolLM2-135M-Instruct GGUF (9 query heads, 3 KV heads; Q4_1/Q8_0 dequantized on
load): greedy tokens at TP 1, 2, 3 (Python API) and 4 (CLI) equal transformers' for 32 tokens,
with speculative decoding too (n-gram drafts at tp=1; the model as its own draft at tp=2, its
draft at tp=2 too, and at tp=3, its draft at tp=1: every draft accepted)."""

from __future__ import annotations

import json

import pytest
from helpers import cli, greedy_reference

from tensorpar import LLM, SamplingParams

PROMPTS = ["Once upon a time", "def fibonacci(n):"]  # neither reaches EOS within 32 tokens
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """Prompt ids and greedy continuations from transformers loading the same GGUF."""
    return greedy_reference(smollm2_gguf, PROMPTS, NEW_TOKENS)[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp, speculative", [
    (1, {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}),
    (2, {"model": "smollm2-135m", "num_speculative_tokens": 4}),
    (3, {"model": "smollm2-135m", "num_speculative_tokens": 4, "draft_tensor_parallel_size": 1})])
def test_greedy_tokens_match_transformers(tp, speculative, reference):
    with LLM("smollm2-135m", tp=tp, progress=False, speculative_config=speculative) as llm:
        result = llm.generate_full(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))
    for c, (ref_prompt, ref_tokens) in zip(result.completions, reference):
        assert c.prompt_token_ids == ref_prompt
        assert c.token_ids == ref_tokens
    assert len(result.peak_rss_mb) == tp
    assert result.speculation["accepted_tokens"] > 0
    if "model" in speculative:
        assert result.speculation["acceptance_rate"] == 1.0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cli_gguf_file_at_tp4(smollm2_gguf, reference):
    r = cli("generate", "--model", str(smollm2_gguf), "--tp", "4", "--json",
            "--max-new-tokens", str(NEW_TOKENS), "--prompt", PROMPTS[0])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tp"] == 4 and out["backend"] == "shm+gloo"
    assert out["prompt_token_ids"] == reference[0][0]
    assert out["token_ids"] == reference[0][1]
    assert out["text"].startswith(", the city of Nova Haven")
    assert len(out["peak_rss_mb"]) == 4


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp, pp", [(1, 3), (2, 2)])
def test_pipeline_stages_give_the_greedy_tokens_of_transformers(tp, pp, reference, rank_pool):
    """30 layers on 3 stages of one rank and on 2 stages of 2 ranks (more layouts on the tiny
    7-layer model in test_pipeline.py)."""
    with LLM("smollm2-135m", tp=tp, pp=pp, progress=False, ranks=rank_pool(tp * pp)) as llm:
        result = llm.generate_full(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))
    for c, (ref_prompt, ref_tokens) in zip(result.completions, reference):
        assert c.prompt_token_ids == ref_prompt
        assert c.token_ids == ref_tokens
