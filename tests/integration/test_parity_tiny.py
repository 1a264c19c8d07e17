"""TP=N against transformers on tiny random checkpoints of every architecture, N = 1 .. the
number of query heads (at most 6).

Real process groups (gloo). Covers uneven head splits (6 heads on 4 and 5 ranks, 5 on 2..4),
KV-head replication (1 KV head on up to 5 ranks; 2 KV heads on 3), uneven vocabulary and MLP
splits, sliding windows shorter than the prompt (Mistral; Gemma 3's local layers beside a global
one) in the KV cache, biases, tied and untied heads, a sharded checkpoint, fused and transposed
checkpoint tensors (Phi-3, GPT-2) and LongRoPE switching to its long factors during decode.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_CONFIGS, hf_logits_and_greedy, num_heads

from tensorpar import LLM, SamplingParams

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "gpt2"]
DEGREES = [(arch, tp) for arch in ARCHS for tp in range(1, min(num_heads(arch), 6) + 1)]
NEW_TOKENS = 10


def prompts_for(arch: str) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    vocab = TINY_CONFIGS[arch]["vocab_size"]
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (20, 7)]


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    """Per architecture: transformers logits of each prompt and its greedy continuation."""
    return {arch: hf_logits_and_greedy(tiny_checkpoints[arch], prompts_for(arch), NEW_TOKENS) for arch in ARCHS}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.timeout(180)
@pytest.mark.parametrize("arch, tp", DEGREES)
def test_logits_and_greedy_tokens_match_transformers(arch, tp, tiny_checkpoints, references, rank_pool):
    ref_logits, ref_greedy = references[arch]
    prompts = prompts_for(arch)
    with LLM(str(tiny_checkpoints[arch]), tp=tp, progress=False, ranks=rank_pool(tp)) as llm:
        assert llm.tp == tp
        logits = llm.score(prompts)
        result = llm.generate_full(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    for got, want in zip(logits, ref_logits):
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-4
    assert [c.token_ids for c in result.completions] == ref_greedy
    assert [c.prompt_token_ids for c in result.completions] == prompts
    assert len(result.peak_rss_mb) == tp and all(m > 0 for m in result.peak_rss_mb)


@pytest.mark.timeout(120)
def test_seeded_sampling_is_reproducible_and_agrees_across_degrees(tiny_checkpoints, rank_pool):
    path = str(tiny_checkpoints["qwen2"])
    prompt = prompts_for("qwen2")[:1]
    sp = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    runs = {}
    for tp in (1, 2):
        with LLM(path, tp=tp, progress=False, ranks=rank_pool(tp)) as llm:
            runs[tp] = [llm.generate_full(prompt, sp).completions[0].token_ids for _ in range(2)]
    assert runs[1][0] == runs[1][1]  # same seed, same draws
    assert runs[2][0] == runs[1][0]  # every rank follows the leader's draw; same as one process
    with LLM(path, tp=1, progress=False, ranks=rank_pool(1)) as llm:
        other = llm.generate_full(prompt, SamplingParams(max_new_tokens=12, temperature=0.8, seed=99, ignore_eos=True))
    assert other.completions[0].token_ids != runs[1][0]


@pytest.mark.timeout(120)
def test_batch_of_different_lengths_equals_each_prompt_alone(tiny_checkpoints, rank_pool):
    path = str(tiny_checkpoints["llama"])
    prompts = prompts_for("llama") + [[5, 6, 7]]
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    with LLM(path, tp=2, progress=False, ranks=rank_pool(2)) as llm:
        batch = [c.token_ids for c in llm.generate_full(prompts, sp).completions]
        alone = [llm.generate_full([p], sp).completions[0].token_ids for p in prompts]
    assert batch == alone
