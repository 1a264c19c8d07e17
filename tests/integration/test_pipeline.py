"""Pipeline stages (tp x pp) against transformers and against one rank, on real process groups:
a tiny 7-layer Llama (tied head, q/k/v/o biases) split evenly and unevenly (7 layers on 2, 3, 4
and 5 stages), with tensor-parallel stages of 2 and 3 ranks."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_CONFIGS, hf_reference

from tensorpar import LLM, SamplingParams
from tensorpar.distributed.dims import ParallelDims
from tensorpar.errors import TensorparError
from tensorpar.partition import stage_layers

LAYOUTS = [(1, 2), (1, 3), (2, 2), (3, 2), (1, 4), (1, 5)]
NEW_TOKENS = 8


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, TINY_CONFIGS["llama7"]["vocab_size"], (n,), generator=g).tolist() for n in (19, 6)]


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    model = hf_reference(tiny_checkpoints["llama7"])
    out = []
    with torch.no_grad():
        for p in prompts():
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            out.append((model(ids).logits[0], gen[0, len(p):].tolist()))
    return out


def test_stage_split_is_the_planners():
    assert [len(stage_layers(7, 4, s)) for s in range(4)] == [2, 2, 2, 1]
    assert [stage_layers(7, 5, s) for s in range(5)] == [range(0, 2), range(2, 4), range(4, 5), range(5, 6),
                                                         range(6, 7)]
    with pytest.raises(TensorparError, match="--pp 8 is more pipeline stages than the model's 7 layers"):
        ParallelDims.resolve(6, 1, pp=8, num_layers=7, supported=("tp", "pp"))
    with pytest.raises(TensorparError, match="--pp 2 is not supported by this command"):
        ParallelDims.resolve(6, 1, pp=2, num_layers=7)
    dims = ParallelDims.resolve(6, None, pp=2, torchrun_world_size=6, supported=("tp", "pp"))
    assert (dims.tp, dims.pp, dims.world_size) == (3, 2, 6) and dims.describe() == "tp=3 pp=2"
    assert [dims.coordinates(r) for r in (0, 2, 3, 5)] == [(0, 0), (0, 2), (1, 0), (1, 2)]
    assert dims.place(4) == "stage 1 of 2, tp rank 1 of 3"
    assert dims.describe_nodes(3) == "tp=3 within each node, pp=2 across 2 nodes"
    assert dims.describe_nodes(6) == dims.describe_nodes(None) == "tp=3 pp=2"
    assert ParallelDims(tp=4).describe_nodes(2) == "tp=4 across 2 nodes"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tp, pp", LAYOUTS)
def test_pipeline_matches_transformers(tp, pp, tiny_checkpoints, reference, rank_pool):
    with LLM(str(tiny_checkpoints["llama7"]), tp=tp, pp=pp, progress=False, ranks=rank_pool(tp * pp)) as llm:
        assert (llm.tp, llm.pp) == (tp, pp) and llm.layout == f"tp={tp} pp={pp}"
        logits = llm.score(prompts())
        batch = llm.generate_full(prompts(), SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        sampled = llm.generate_full(prompts()[:1], SamplingParams(max_new_tokens=6, temperature=0.9, seed=3,
                                                                  ignore_eos=True))
    for got, (want, _) in zip(logits, reference):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    assert [c.token_ids for c in batch.completions] == [tokens for _, tokens in reference]
    assert len(batch.peak_rss_mb) == tp * pp
    with LLM(str(tiny_checkpoints["llama7"]), tp=1, progress=False, ranks=rank_pool(1)) as one:
        alone = one.generate_full(prompts()[:1], SamplingParams(max_new_tokens=6, temperature=0.9, seed=3,
                                                                ignore_eos=True))
    assert sampled.completions[0].token_ids == alone.completions[0].token_ids
