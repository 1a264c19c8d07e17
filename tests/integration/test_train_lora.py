"""LoRA under tensor parallelism: the same adapters and losses at every degree, adapter-only
checkpoints, a merged export that transformers loads, and adapters served on their base.

The base is the random tiny model written as a Hugging Face directory (what a user fine-tunes);
every projection is adapted, so column-parallel (q, k, v, gate, up: B split by rows, KV heads
replicated at tp 3) and row-parallel (o, down: A split by columns) adapters are all exercised.
"""

from __future__ import annotations

import pytest
import torch

from tensorpar.distributed.groups import single_process_context
from tensorpar.errors import TensorparError
from tensorpar.runtime import LLM
from tensorpar.train.export import export_hf, write_hf
from tensorpar.train.init import random_source
from tensorpar.train.trainer import TrainConfig, Trainer, TrainSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TOKENS = torch.randint(0, 49152, (3000,), generator=torch.Generator().manual_seed(2))
STEPS = 6


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(write_hf(random_source("random-llama-tiny", 11), tmp_path_factory.mktemp("base") / "hf"))


def spec(base, **kw) -> TrainSpec:
    args = dict(data=__file__, model=base, steps=STEPS, seq_len=32, batch=6, lr=1e-2, seed=4, timeout_s=120.0,
                lora_rank=4, lora_alpha=8.0, lora_targets="q,k,v,o,gate,up,down")
    return TrainSpec.resolve(TrainConfig(**{**args, **kw}))


def on_ranks(rank_pool, s: TrainSpec):
    ranks = rank_pool(s.dims.world_size)
    ranks.rebuild(Trainer, (s, TOKENS))
    return ranks


@pytest.fixture(scope="module")
def reference(base):
    trainer = Trainer(single_process_context(), spec(base), TOKENS)
    initial = trainer.full_tensors()
    steps = trainer.run_steps(STEPS)
    return {"initial": initial, "losses": [r["loss"] for r in steps], "final": trainer.full_tensors()}


def test_only_the_adapters_train_and_they_start_as_drawn(reference):
    initial = reference["initial"]
    assert len(initial) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    a, b = initial["model.layers.0.self_attn.q_proj.lora_A.weight"], initial["model.layers.0.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 96) and b.shape == (96, 4) and not b.any()  # B starts at zero: the base model
    assert 0 < float(a.abs().max()) <= 96 ** -0.5  # A uniform in +-1/sqrt(in)
    assert reference["losses"][-1] < reference["losses"][0]
    assert reference["final"]["model.layers.0.mlp.down_proj.lora_B.weight"].any()


@pytest.mark.parametrize("layout", [dict(tp=3), dict(tp=3, sp=True), dict(tp=2, pp=2)],
                         ids=["tp3", "tp3-sp", "tp2-pp2"])
def test_same_adapters_and_losses_at_every_degree(layout, reference, base, rank_pool):
    ranks = on_ranks(rank_pool, spec(base, **layout))
    initial = ranks.call("full_tensors")
    assert set(initial) == set(reference["initial"])
    for name, full in reference["initial"].items():
        assert torch.equal(initial[name], full), name  # drawn in full from (seed, name), then sliced
    losses = [r["loss"] for r in ranks.call("run_steps", STEPS)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference["losses"]), rtol=1e-6, atol=0)


def test_adapter_checkpoint_merged_export_and_serving(reference, base, rank_pool, tmp_path):
    """Saved at tp=2: only the adapters; resumed at tp=3; merged, the export loads in transformers
    with tensorpar's log-probabilities, and the adapters served on the base at tp=3 generate what
    the merged model does."""
    ranks = on_ranks(rank_pool, spec(base, tp=2))
    ranks.call("run_steps", STEPS - 2)
    path = ranks.call("save", str(tmp_path / "run"))
    from safetensors import safe_open

    with safe_open(f"{path}/rank-00000-of-00002.safetensors", "pt") as f:
        assert {k.split("/")[0] for k in f.keys()} == {"model", "exp_avg", "exp_avg_sq"}
        assert all("_lora.A_" in k or "_lora.B_" in k for k in f.keys())  # (local names of the adapter parameters)
    resumed = on_ranks(rank_pool, spec(base, tp=3, resume=path))
    rest = [r["loss"] for r in resumed.call("run_steps", 2)]
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(reference["losses"][-2:]), rtol=1e-6, atol=0)
    prompt = TOKENS[:24].tolist()
    ours = ranks.call("token_logprobs", [prompt])[0]  # the tp=2 run at step 4, adapters applied by hooks

    with pytest.raises(TensorparError, match="holds LoRA adapters only"):
        export_hf(path, tmp_path / "plain")
    merged = export_hf(path, tmp_path / "merged", merge_lora=True)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, :-1].double()
    theirs = logits.log_softmax(-1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), theirs, rtol=0, atol=1e-4)

    with LLM(str(merged), progress=False) as llm:
        expected = llm.generate([prompt], max_new_tokens=8, ignore_eos=True)[0].token_ids
    with LLM(base, tp=3, lora_adapter=path, progress=False, ranks=rank_pool(3)) as llm:
        served = llm.generate([prompt], max_new_tokens=8, ignore_eos=True)[0].token_ids
    assert list(served) == list(expected) and len(expected) == 8


def test_bad_lora_settings_are_refused(base, tmp_path):
    with pytest.raises(TensorparError, match="--lora-targets: qq"):
        spec(base, lora_targets="q,qq")
    with pytest.raises(TensorparError, match="does not cover .*--lora-rank"):
        spec(base, deterministic=True)
    with pytest.raises(TensorparError, match="no checkpoint at"):
        LLM(base, lora_adapter=str(tmp_path / "none"), progress=False)
    with pytest.raises(TensorparError, match="merges into float weights"):
        LLM(base, lora_adapter=str(tmp_path / "none"), quantization="gguf", progress=False)
