"""Weight-only int8 and int4, and the GGUF file's own Q4_1 / Q8_0 blocks (``gguf``), on the real
SmolLM2-135M at TP 1, 2 and 3, against the float32 model (the same file dequantized):
logits within each format's documented error, and greedy tokens equal to float32's up to the first
position where float32's own top two are close (a near-tie the rounding may flip)."""

from __future__ import annotations

import pytest
import torch

from tensorpar import LLM, SamplingParams

PROMPTS = ["Once upon a time", "def fibonacci(n):"]
NEW_TOKENS = 24
LOGIT_ERROR = {"int8": 0.08, "int4": 0.25, "gguf": 0.05}  # max |logit - float32 logit| / max |float32 logit| (README)
NEAR_TIE = {"int8": 0.5, "int4": 1.0, "gguf": 0.5}  # float32's top-2 logit margin below which a flip is a near-tie


@pytest.fixture(scope="module")
def float_model():
    """The float32 model's logits at every prompt position, its greedy tokens, and a scorer."""
    llm = LLM("smollm2-135m", tp=1, progress=False)
    ids = [c.prompt_token_ids for c in llm.generate_full(PROMPTS, SamplingParams(max_new_tokens=1)).completions]
    greedy = [c.token_ids for c in llm.generate_full(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS,
                                                                             ignore_eos=True)).completions]
    yield ids, llm.score(ids), greedy, llm
    llm.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("quantization, tp", [("int8", 2), ("int4", 1), ("int4", 3), ("gguf", 1), ("gguf", 3)])
def test_quantized_logits_and_greedy_tokens_against_float32(quantization, tp, float_model, rank_pool):
    ids, ref_logits, ref_greedy, reference = float_model
    with LLM("smollm2-135m", tp=tp, quantization=quantization, progress=False, ranks=rank_pool(tp)) as llm:
        logits = llm.score(ids)
        greedy = [c.token_ids for c in llm.generate_full(ids, SamplingParams(max_new_tokens=NEW_TOKENS,
                                                                            ignore_eos=True)).completions]
        rss = llm.generate_full(ids[:1], SamplingParams(max_new_tokens=1)).peak_rss_mb
    for got, want in zip(logits, ref_logits):
        assert float((got - want).abs().max() / want.abs().max()) < LOGIT_ERROR[quantization]
    for prompt, got, want in zip(ids, greedy, ref_greedy):
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        if same < len(want):  # float32's logits where the two part: their top two must be close
            top2 = torch.topk(reference.score([prompt + want[:same]])[0][-1], 2).values
            assert float(top2[0] - top2[1]) < NEAR_TIE[quantization], (quantization, tp, same)
    assert len(rss) == tp
