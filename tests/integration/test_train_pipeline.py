"""Pipeline-parallel training (``--pp``, 1F1B and interleaved) equals single-process training.

Real process groups: the stages' sends are torch's pipelining schedules over gloo, each stage's
tensor-parallel collectives in shared memory. A six-layer model, so that three stages of two
runs each (interleaved) have a layer apiece; clipping is on and acts at every step, so the
losses also check the clipped global norm.
"""

from __future__ import annotations

import pytest
import torch

from tensorpar.distributed.groups import single_process_context
from tensorpar.errors import TensorparError
from tensorpar.train.trainer import TrainConfig, Trainer, TrainSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TOKENS = torch.randint(0, 49152, (3000,), generator=torch.Generator().manual_seed(1))
STEPS = 10


def spec(**kw) -> TrainSpec:
    base = dict(data=__file__, model="random-llama-tiny-6l", steps=STEPS, seq_len=32, batch=6, lr=3e-3, seed=5,
                clip_grad_norm=0.5, eval_every=5, timeout_s=120.0)  # (the same held-out split in every run)
    return TrainSpec.resolve(TrainConfig(**{**base, **kw}))


def on_ranks(rank_pool, s: TrainSpec):
    ranks = rank_pool(s.dims.world_size)
    ranks.rebuild(Trainer, (s, TOKENS))
    return ranks


@pytest.fixture(scope="module")
def reference():
    trainer = Trainer(single_process_context(), spec(), TOKENS)
    steps = trainer.run_steps(STEPS)
    return {"losses": [r["loss"] for r in steps], "norms": [r["grad_norm"] for r in steps],
            "eval": trainer.evaluate()["loss"], "weights": trainer.full_tensors()}


def close(got: list[float], expected: list[float], rtol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=rtol, atol=0)


@pytest.mark.parametrize("layout", [dict(tp=2, pp=2), dict(tp=1, pp=3), dict(tp=1, pp=3, virtual_stages=2),
                                    dict(tp=3), dict(tp=2, pp=2, sp=True, virtual_stages=3, grad_accum=6),
                                    dict(pp=2, dp=2, grad_accum=3)],
                         ids=["tp2-pp2", "pp3-1f1b", "pp3-interleaved", "tp3", "tp2-pp2-sp-interleaved", "pp2-dp2"])
def test_ten_steps_equal_single_process(layout, reference, rank_pool):
    ranks = on_ranks(rank_pool, spec(**layout))
    steps = ranks.call("run_steps", STEPS)
    assert min(r["grad_norm"] for r in steps) > 0.5  # clipping acted at every step
    close([r["loss"] for r in steps], reference["losses"])
    # the global norm counts each element once (no stage, no tied copy twice): equal on equal weights (step 1),
    # then as near as the weights, which float sums in another order have moved by ~1e-7
    norms = [r["grad_norm"] for r in steps]
    close(norms[:1], reference["norms"][:1])
    close(norms, reference["norms"], rtol=1e-4)
    assert ranks.call("evaluate")["loss"] == pytest.approx(reference["eval"], rel=1e-6)  # forward-only stages
    weights = ranks.call("full_tensors")  # (AdamW moves ~1e-7 gradient differences to ~1e-5 in the weights)
    assert set(weights) == set(reference["weights"])
    for name, full in reference["weights"].items():
        torch.testing.assert_close(weights[name], full, rtol=0, atol=2e-4, msg=name)


def test_saved_at_tp2_pp2_resumes_at_tp3(reference, rank_pool, tmp_path):
    ranks = on_ranks(rank_pool, spec(tp=2, pp=2))
    first = ranks.call("run_steps", 4)
    path = ranks.call("save", str(tmp_path))
    files = sorted(p.name for p in (tmp_path / "step-00000004").glob("*.safetensors"))
    assert files == [f"stage-{s:03d}-rank-{t:05d}-of-00002.safetensors" for s in range(2) for t in range(2)]
    resumed = on_ranks(rank_pool, spec(tp=3, resume=path))
    rest = resumed.call("run_steps", STEPS - 4)
    close([r["loss"] for r in first + rest], reference["losses"])
    again = on_ranks(rank_pool, spec(tp=1, pp=3, virtual_stages=2, resume=path))  # and into other stages
    close([r["loss"] for r in again.call("run_steps", 2)], reference["losses"][4:6])


def test_pipelines_that_cannot_run_are_refused_before_launch():
    with pytest.raises(TensorparError, match="at least 3 micro-batches"):
        spec(pp=3, grad_accum=2, batch=6)
    with pytest.raises(TensorparError, match="12 stages for the model's 6 layers"):
        spec(pp=3, virtual_stages=4)
    with pytest.raises(TensorparError, match="give --pp 2 or more"):
        spec(virtual_stages=2)
    with pytest.raises(TensorparError, match="does not cover --dropout"):
        spec(pp=2, dropout=0.1)
    with pytest.raises(TensorparError, match="--pp 2"):
        spec(pp=2, deterministic=True)
    assert spec(pp=3).cfg.grad_accum == 3  # the default: as many micro-batches as stages
