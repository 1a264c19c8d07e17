"""Sharded checkpoints: saved at TP=2, resumed at TP=3 and TP=1 with bit-identical full tensors
(weights and AdamW moments) and the same next-step loss; a rank killed during a save leaves the
previous checkpoint loadable; an exported checkpoint loads in transformers with the same logits."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_train_parallel import TOKENS, spec

from tensorpar.distributed.groups import single_process_context
from tensorpar.distributed.ranks import SpawnedRanks
from tensorpar.errors import RankFailure
from tensorpar.loading import ShardedCheckpointSource, find_checkpoint
from tensorpar.loading.loader import load_weights
from tensorpar.models.llama import LlamaForCausalLM
from tensorpar.train.export import export_hf
from tensorpar.train.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KINDS = ("model", "exp_avg", "exp_avg_sq")


class DiesDuringSave(Trainer):
    """With ``die``, rank 0 is killed at the last moment of a save: every file written, not renamed."""

    def save(self, root, die=False):
        if die:
            import tensorpar.train.checkpoint as checkpoint

            def killed(tmp, final):
                os.kill(os.getpid(), signal.SIGKILL)

            checkpoint.commit = killed
        return super().save(root)


@pytest.fixture(scope="module")
def saved_at_tp2(tmp_path_factory):
    """Three steps at TP=2 with SP, saved; the full state then; the loss of step 4 when the run goes on."""
    root = tmp_path_factory.mktemp("run")
    ranks = SpawnedRanks(2, Trainer, (spec(tp=2, sp=True), TOKENS), timeout_s=120)
    try:
        ranks.call("run_steps", 3)
        path = ranks.call("save", str(root))
        state = {kind: ranks.call("full_tensors", kind) for kind in KINDS}
        next_loss = ranks.call("train_step")["loss"]
    finally:
        ranks.close()
    return root, path, state, next_loss


def test_checkpoint_layout(saved_at_tp2):
    root, path, state, _ = saved_at_tp2
    assert find_checkpoint(root) == find_checkpoint(path) and path.endswith("step-00000003")
    files = sorted(os.listdir(path))
    assert "rank-00000-of-00002.safetensors" in files and "rank-00001-of-00002.safetensors" in files
    assert "metadata.json" in files and "config.json" in files and "tokenizer.json" in files
    assert not [p for p in os.listdir(root) if p.startswith(".")]
    source = ShardedCheckpointSource(root)
    assert source.step == 3 and source.names() == set(state["model"])
    for name, full in state["model"].items():
        assert torch.equal(source.read(name), full), name


@pytest.mark.parametrize("tp", [3, 1])
def test_resume_at_another_degree(tp, saved_at_tp2):
    root, _, state, next_loss = saved_at_tp2
    ranks = SpawnedRanks(tp, Trainer, (spec(tp=tp, resume=str(root)), TOKENS), timeout_s=120)
    try:
        resumed = {kind: ranks.call("full_tensors", kind) for kind in KINDS}
        step = ranks.call("train_step")
    finally:
        ranks.close()
    for kind in KINDS:
        assert set(resumed[kind]) == set(state[kind])
        for name, full in state[kind].items():
            assert torch.equal(resumed[kind][name], full), (kind, name)
    assert step["step"] == 4
    assert step["loss"] == pytest.approx(next_loss, rel=1e-5)


def test_killed_during_save_leaves_previous_checkpoint(tmp_path):
    ranks = SpawnedRanks(2, DiesDuringSave, (spec(tp=2), TOKENS), timeout_s=120)
    try:
        ranks.call("run_steps", 1)
        ranks.call("save", str(tmp_path))
        saved = ranks.call("full_tensors", "model")
        ranks.call("run_steps", 1)
        with pytest.raises(RankFailure, match="rank 0 of 2 failed: killed by signal SIGKILL"):
            ranks.call("save", str(tmp_path), die=True)
    finally:
        ranks.close()
    assert (tmp_path / ".step-00000002.tmp" / "metadata.json").is_file()  # written, never committed
    assert find_checkpoint(tmp_path) == tmp_path / "step-00000001"
    resumed = Trainer(single_process_context(), spec(resume=str(tmp_path)), TOKENS)
    assert resumed.step_done == 1
    state = resumed.full_tensors("model")
    assert all(torch.equal(state[n], saved[n]) for n in saved)


def test_export_loads_in_transformers_with_the_same_logits(saved_at_tp2, tmp_path):
    from transformers import AutoModelForCausalLM

    root, _, state, _ = saved_at_tp2
    out = export_hf(root, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = LlamaForCausalLM(ShardedCheckpointSource(root).config)
    load_weights(ours, ShardedCheckpointSource(root))
    ids = TOKENS[:24].unsqueeze(0)
    with torch.no_grad():
        expected = ours.logits(ours(ids))
        got = hf(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(hf.model.embed_tokens.weight, state["model"]["model.embed_tokens.weight"])
