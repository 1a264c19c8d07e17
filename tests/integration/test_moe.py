"""Mixtures of experts against transformers on tiny random checkpoints (Mixtral with 8 experts,
Qwen2-MoE with 6 and a shared expert, Qwen3-MoE with 6 and a dense layer), over real process
groups, at (tp, ep) = (1, 1), (1, 2) (attention replicated on the two ranks), (2, 2) (attention
TP = expert sets), (1, 4) and (3, 3) (uneven: 6 experts as 2+2+1+1, 8 as 3+3+2) and (4, 2)
(each expert split over 2 ranks, in 2 sets)."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_CONFIGS, hf_logits_and_greedy

from tensorpar import LLM, SamplingParams

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
LAYOUTS = [(1, 1), (1, 2), (2, 2), (1, 4), (3, 3), (4, 2)]
NEW_TOKENS = 8


def prompts_for(arch: str) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, TINY_CONFIGS[arch]["vocab_size"], (n,), generator=g).tolist() for n in (17, 5)]


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    return {arch: hf_logits_and_greedy(tiny_checkpoints[arch], prompts_for(arch), NEW_TOKENS) for arch in ARCHS}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tp, ep", LAYOUTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_tokens_match_transformers(arch, tp, ep, tiny_checkpoints, references, rank_pool):
    ref_logits, ref_greedy = references[arch]
    prompts = prompts_for(arch)
    width = max(tp, ep)
    with LLM(str(tiny_checkpoints[arch]), tp=tp, ep=ep, progress=False, ranks=rank_pool(width)) as llm:
        logits = llm.score(prompts)
        result = llm.generate_full(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    for got, want in zip(logits, ref_logits):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    assert [c.token_ids for c in result.completions] == ref_greedy
    assert len(result.peak_rss_mb) == width


@pytest.fixture(scope="module")
def gguf_moe(tiny_checkpoints, tmp_path_factory):
    """llama.cpp-style GGUF files (experts stacked per layer) of the tiny Mixtral and of a
    Qwen3-MoE whose layers are all sparse (GGUF has no dense layers beside experts), each with
    transformers' logits and greedy tokens on the safetensors weights it was written from."""
    from helpers import write_tiny_checkpoint
    from gguf_tiny import write_gguf

    root = tmp_path_factory.mktemp("gguf-moe")
    TINY_CONFIGS.setdefault("qwen3_moe-sparse", {**TINY_CONFIGS["qwen3_moe"], "mlp_only_layers": []})
    sources = {"mixtral": tiny_checkpoints["mixtral"],
               "qwen3_moe": write_tiny_checkpoint("qwen3_moe-sparse", root / "qwen3_moe")}
    out = {}
    for arch, hf_dir in sources.items():
        prompts = prompts_for(arch)
        out[arch] = (write_gguf(hf_dir, root / f"{arch}.gguf"), prompts, hf_logits_and_greedy(hf_dir, prompts, NEW_TOKENS))
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tp, ep", [(1, 1), (2, 2), (1, 4)])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_gguf_files_with_stacked_experts_match_transformers(arch, tp, ep, gguf_moe, rank_pool):
    from tensorpar.loading import open_source

    path, prompts, (ref_logits, ref_greedy) = gguf_moe[arch]
    config = open_source(str(path)).config
    assert config.architecture == arch and config.num_experts == (8 if arch == "mixtral" else 6)
    with LLM(str(path), tp=tp, ep=ep, progress=False, ranks=rank_pool(max(tp, ep))) as llm:
        logits = llm.score(prompts)
        result = llm.generate_full(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    for got, want in zip(logits, ref_logits):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    assert [c.token_ids for c in result.completions] == ref_greedy


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tp, ep", [(1, 2), (3, 3), (1, 4)])
@pytest.mark.parametrize("arch", ARCHS)
def test_all_to_all_dispatch_matches_transformers(arch, tp, ep, tiny_checkpoints, references, rank_pool):
    """Each rank routing its slice of the tokens (decode steps of 2 tokens leave the others none)
    and sending the rows to their experts' ranks and back; the same routing counts as ``reduce``."""
    ref_logits, ref_greedy = references[arch]
    prompts = prompts_for(arch)
    loads = {}
    for dispatch in ("all_to_all", "reduce"):
        with LLM(str(tiny_checkpoints[arch]), tp=tp, ep=ep, moe_dispatch=dispatch, progress=False,
                 ranks=rank_pool(max(tp, ep))) as llm:
            if dispatch == "all_to_all":
                logits = llm.score(prompts)
            result = llm.generate_full(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
            loads[dispatch] = result.experts
            assert [c.token_ids for c in result.completions] == ref_greedy
    for got, want in zip(logits, ref_logits):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    assert loads["all_to_all"] == loads["reduce"]
    tokens = sum(len(p) for p in prompts) + len(prompts) * (NEW_TOKENS - 1)  # the last token is never fed back
    k = TINY_CONFIGS[arch]["num_experts_per_tok"]
    assert all(sum(counts) == tokens * k for counts in loads["reduce"]["tokens"].values())
