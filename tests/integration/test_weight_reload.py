"""A reinforcement-learning loop's two halves in deterministic mode: weights replaced in a running
engine (``LLM.load_weights``; the server's route: tests/e2e/test_serve_openai.py) and the trainer's
log-probabilities. A training checkpoint saved at tp=2 and loaded into an LLM at tp=3 gives, bit
for bit, the logits and tokens of that checkpoint loaded afresh at tp=1, with no stale
prefix-cache hit; another model is refused and the weights stay; and a trainer at tp=2 resumed
from it computes each token's log-probability equal by ``==`` to the engine's ``prompt_logprobs``."""

from __future__ import annotations

import pytest
import torch

from tensorpar import LLM, SamplingParams
from tensorpar.errors import TensorparError
from tensorpar.layers import deterministic

PROMPT = "The weights of a newer training step, loaded in place"


@pytest.fixture
def restores_the_mode():
    yield
    deterministic.enable(False)


@pytest.mark.timeout(300)
def test_a_checkpoint_saved_at_tp2_loads_into_a_running_tp3_llm_and_its_trainer_agrees_bit_for_bit(
        tiny_chat_checkpoint, tiny_moe_chat_checkpoint, trained_chat_checkpoint, restores_the_mode):
    trained = trained_chat_checkpoint
    with LLM(str(trained), tp=1, deterministic=True, progress=False) as fresh:
        want = fresh.generate([PROMPT], max_new_tokens=16, ignore_eos=True)[0]
        want_logits = fresh.score([list(want.prompt_token_ids) + list(want.token_ids)])[0]
    with LLM(str(tiny_chat_checkpoint), tp=3, deterministic=True, progress=False) as llm:
        before = llm.generate([PROMPT], max_new_tokens=16, ignore_eos=True)[0]  # (its prompt's blocks now cached)
        with pytest.raises(TensorparError, match="holds another model than the one loaded: architecture: "):
            llm.load_weights(tiny_moe_chat_checkpoint)
        assert llm.generate([PROMPT], max_new_tokens=16, ignore_eos=True)[0].token_ids == before.token_ids
        assert llm.load_weights(trained) > 0
        run = llm.generate_full([PROMPT], SamplingParams(max_new_tokens=16, ignore_eos=True))
        after = run.completions[0]
        logits = llm.score([list(after.prompt_token_ids) + list(after.token_ids)])[0]
        rollouts = [list(c.prompt_token_ids) + list(c.token_ids)
                    for c in llm.generate(["Tensor parallelism", PROMPT], max_new_tokens=12, ignore_eos=True)]
        scored = llm.generate_full(rollouts, SamplingParams(max_new_tokens=0, prompt_logprobs=0)).completions
    assert run.cache["prefix_cache_hits"] == 0  # the old weights' keys and values were forgotten
    assert before.token_ids != want.token_ids  # the training steps changed the answer
    assert after.token_ids == want.token_ids
    assert torch.equal(logits, want_logits), (logits - want_logits).abs().max()
    engine = [[logprob for _, logprob, _ in c.prompt_logprobs[1:]] for c in scored]
    trainer = _trainer_logprobs(trained, rollouts)
    assert [len(t) for t in trainer] == [len(r) - 1 for r in rollouts]
    assert trainer == engine  # floats, compared exactly


def _trainer_logprobs(checkpoint, sequences: list[list[int]]) -> list[list[float]]:
    """``Trainer.token_logprobs`` of a deterministic trainer at tp=2 resumed from ``checkpoint``."""
    from tensorpar.distributed.ranks import SpawnedRanks
    from tensorpar.train.trainer import TrainConfig, Trainer, TrainSpec

    spec = TrainSpec.resolve(TrainConfig(data=__file__, tp=2, steps=3, seq_len=16, batch=2, deterministic=True,
                                         resume=str(checkpoint), timeout_s=120.0))
    ranks = SpawnedRanks(2, Trainer, (spec, torch.randint(0, 1000, (256,))), timeout_s=120)
    try:
        return ranks.call("token_logprobs", sequences)
    finally:
        ranks.close()
