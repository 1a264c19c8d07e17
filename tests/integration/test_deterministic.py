"""Deterministic mode (``--deterministic``, ``LLM(deterministic=True)``): the logits of a prompt
are bitwise equal at every tensor-parallel degree, odd and uneven ones included, and close to the
default mode's (the grid computes the same product, only in a fixed order); greedy tokens equal
too. What it does not cover yet is refused before any rank starts."""

from __future__ import annotations

import pytest
import torch
from helpers import cli

from tensorpar import LLM
from tensorpar.errors import TensorparError
from tensorpar.layers import deterministic
from tensorpar.runtime.spec import EngineArgs

PROMPTS = ["The deterministic mode makes every degree agree on every bit", "Tensor parallelism"]


@pytest.fixture
def restores_the_mode():
    yield
    deterministic.enable(False)  # (a tp=1 LLM sets it in this process)


@pytest.mark.timeout(300)
def test_logits_are_bitwise_equal_at_every_degree(tiny_chat_checkpoint, restores_the_mode):
    model = str(tiny_chat_checkpoint)
    with LLM(model, tp=1, progress=False) as llm:
        default = llm.score(PROMPTS[:1])[0]
    seen = {}
    for tp in (1, 4):  # 6 query heads over 2 KV heads: 4 splits them unevenly (2 and 3: below, and test_cli_check)
        with LLM(model, tp=tp, deterministic=True, progress=False) as llm:
            done = llm.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)
            tokens = [c.token_ids for c in done]
            seen[tp] = (llm.score([list(c.prompt_token_ids) + list(c.token_ids) for c in done]), tokens)
    (logits, *_), tokens = seen[1]
    assert torch.allclose(logits[: len(default)], default, rtol=1e-4, atol=1e-4)  # the same products, other orders
    for tp, (other, other_tokens) in seen.items():
        assert other_tokens == tokens, tp
        for a, b in zip(other, seen[1][0]):  # every position of prompt and completion, teacher-forced
            assert torch.equal(a, b), (tp, (a - b).abs().max())


def test_what_it_does_not_cover_is_refused_before_any_rank_starts(tiny_chat_checkpoint, tiny_moe_chat_checkpoint):
    from tensorpar.train.trainer import TrainConfig, TrainSpec

    with pytest.raises(TensorparError, match=r"^train --deterministic does not cover --dp 3 \(at most 2\), --dropout yet$"):
        TrainConfig(data=__file__, dp=3, batch=6, dropout=0.1, deterministic=True).validate()
    with pytest.raises(TensorparError, match=r"^train --deterministic --sp needs a --seq-len that --tp 3 divides"):
        TrainSpec.resolve(TrainConfig(data=__file__, model=str(tiny_chat_checkpoint), tp=3, sp=True, seq_len=16,
                                      deterministic=True))
    with pytest.raises(TensorparError, match=r"^--deterministic does not cover --dtype bfloat16 \(float32 only\) yet$"):
        EngineArgs(str(tiny_chat_checkpoint), tp=2, deterministic=True, dtype="bfloat16").resolve()
    r = cli("generate", "--model", str(tiny_moe_chat_checkpoint), "--deterministic", "--quantization", "int8",
            "--prompt", "hi")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "tensorpar: error: --deterministic does not cover --quantization int8 (float weights only) yet"


@pytest.mark.timeout(300)
def test_a_sequence_is_the_same_alone_beside_others_in_chunks_and_teacher_forced(tiny_chat_checkpoint,
                                                                                 restores_the_mode):
    """Batch invariance: a greedy sequence's tokens and their log-probabilities are the same
    computed alone (tp=2), packed beside other prompts, and at tp=3 with its prompt prefilled in
    chunks of at most 7 tokens beside a running decode (``max_num_batched_tokens=8``, two sequences
    at a time: the prompt is admitted when a short request ends); its teacher-forced logits pick
    the same tokens."""
    from tensorpar import SamplingParams

    model, prompt = str(tiny_chat_checkpoint), PROMPTS[0]
    others = ["A B C D E F G H I J K L M N O P", "Short"]
    params = [SamplingParams(max_new_tokens=40, ignore_eos=True), SamplingParams(max_new_tokens=3, ignore_eos=True),
              SamplingParams(max_new_tokens=20, ignore_eos=True)]
    with LLM(model, tp=2, deterministic=True, progress=False) as llm:
        alone = llm.generate_full([prompt], params[-1]).completions[0]
        packed = llm.generate_full([*others, prompt], params).completions[-1]
        scored = llm.score([list(alone.prompt_token_ids) + list(alone.token_ids)])[0]
    with LLM(model, max_num_seqs=2, tp=3, deterministic=True, progress=False, max_num_batched_tokens=8) as llm:
        run = llm.generate_full([*others, prompt], params)
    chunked = run.completions[-1]
    assert len(alone.prompt_token_ids) > 7 and run.timings["decode_steps"] > 0
    assert alone.token_ids == packed.token_ids == chunked.token_ids
    assert alone.logprobs == packed.logprobs == chunked.logprobs  # floats, compared exactly
    n = len(alone.prompt_token_ids)
    assert scored[n - 1:-1].argmax(-1).tolist() == list(alone.token_ids)


@pytest.mark.timeout(400)
def test_stages_backend_threads_prefix_hits_and_preemption_change_no_bit(tiny_chat_checkpoint, restores_the_mode):
    """The same greedy sequences, their log-probabilities and their teacher-forced logits, equal
    bit for bit: at tp=1 on one and on two threads, over two pipeline stages of tp=2, over gloo
    instead of shared memory, and at tp=3 under a KV budget that preempts and recomputes, with a
    second run of the prompts served from the prefix cache."""
    from tensorpar import SamplingParams

    model = str(tiny_chat_checkpoint)
    prompts = [PROMPTS[0], "A B C D E F G H I J K L M N O P", "Short", PROMPTS[1]]
    sp = SamplingParams(max_new_tokens=32, ignore_eos=True)

    def run(llm, twice=False):
        runs = [llm.generate_full(prompts, sp) for _ in range(2 if twice else 1)]
        done = runs[-1].completions
        scored = llm.score([list(c.prompt_token_ids) + list(c.token_ids) for c in done])
        return [(c.token_ids, c.logprobs) for c in done], scored, runs

    torch_threads = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with LLM(model, tp=1, deterministic=True, progress=False) as llm:
                results[f"tp=1 threads={threads}"] = run(llm)[:2]
    finally:
        torch.set_num_threads(torch_threads)
    with LLM(model, tp=2, pp=2, comm="gloo", deterministic=True, progress=False) as llm:
        results["tp=2 pp=2 over gloo"] = run(llm)[:2]
    # tp=3: a KV budget of 14 blocks of 4 positions, less than the 4 sequences' 40-odd positions
    # each: the newest are preempted as the oldest grow
    with LLM(model, tp=3, deterministic=True, progress=False, block_size=4, max_model_len=56,
             kv_cache_memory=32 * 512) as llm:
        completions, scored, runs = run(llm, twice=True)
        results["tp=3 preempted, prefix hits"] = (completions, scored)
    assert runs[0].cache["preemptions"] > 0 and runs[1].cache["prefix_cache_hits"] > 0, [r.cache for r in runs]
    (tokens, logits) = results.pop("tp=1 threads=1")
    for name, (other_tokens, other_logits) in results.items():
        assert other_tokens == tokens, name  # token ids and log-probabilities, floats compared exactly
        for a, b in zip(other_logits, logits):
            assert torch.equal(a, b), (name, (a - b).abs().max())


def _train(model: str, tp: int, steps: int, dp: int = 1, sp: bool = False, save: str | None = None,
           resume: str | None = None):
    """``steps`` deterministic steps at ``tp`` x ``dp`` (``sp``: with sequence parallelism):
    their losses, the full weights after, and the checkpoint saved (``save``)."""
    from tensorpar.distributed.ranks import SpawnedRanks
    from tensorpar.train.trainer import TrainConfig, Trainer, TrainSpec

    spec = TrainSpec.resolve(TrainConfig(data=__file__, model=model, tp=tp, dp=dp, sp=sp, steps=5, seq_len=12, batch=4,
                                         lr=1e-2, deterministic=True, resume=resume, timeout_s=120.0))
    tokens = torch.randint(0, 1000, (2000,), generator=torch.Generator().manual_seed(0))
    ranks = SpawnedRanks(tp * dp, Trainer, (spec, tokens), timeout_s=120)
    try:
        losses = [s["loss"] for s in ranks.call("run_steps", steps)]
        return losses, ranks.call("full_tensors", "model"), ranks.call("save", save) if save else None
    finally:
        ranks.close()


@pytest.mark.timeout(400)
def test_training_is_bitwise_equal_at_tp_1_2_3_and_resumes_at_another_degree_as_if_never_stopped(
        tiny_chat_checkpoint, tmp_path, restores_the_mode):
    """5 steps at tp=1; 2 at tp=2, saved, and 3 more resumed at tp=3 with sequence parallelism:
    the losses equal by ``==`` and the weights after by ``torch.equal`` (6 query heads over 2 KV
    heads: at tp=3 a KV head is held by two ranks); and 2 steps of two data-parallel replicas at
    tp=1 and at tp=2 with sequence parallelism."""
    model = str(tiny_chat_checkpoint)
    losses, weights, _ = _train(model, 1, 5)
    first, _, saved = _train(model, 2, 2, save=str(tmp_path))
    rest, resumed, _ = _train(model, 3, 3, sp=True, resume=saved)
    assert first + rest == losses, (first + rest, losses)
    assert all(torch.equal(resumed[n], weights[n]) for n in weights), [n for n in weights
                                                                       if not torch.equal(resumed[n], weights[n])]
    assert losses[-1] < losses[0]  # (it learns)
    data_parallel = [_train(model, tp, 2, dp=2, sp=tp > 1)[:2] for tp in (1, 2)]
    assert data_parallel[0][0] == data_parallel[1][0]
    assert all(torch.equal(data_parallel[0][1][n], data_parallel[1][1][n]) for n in weights)


@pytest.mark.timeout(300)
def test_a_mixture_of_experts_is_bitwise_equal_at_every_tp_and_ep(tiny_moe_chat_checkpoint, restores_the_mode):
    """Qwen2-MoE (6 experts, top-2, a shared expert): greedy tokens and teacher-forced logits equal
    by ``torch.equal`` at tp=1, at tp=2 with the experts whole over two expert sets, and at tp=3
    with them split by rows (a rank then holds none of an expert's rows)."""
    model = str(tiny_moe_chat_checkpoint)
    seen = {}
    for tp, ep in ((1, 1), (2, 2), (3, 1)):
        with LLM(model, tp=tp, ep=ep, deterministic=True, progress=False) as llm:
            done = llm.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
            sequences = seen.get((1, 1), (None, [list(c.prompt_token_ids) + list(c.token_ids) for c in done]))[1]
            seen[(tp, ep)] = ([c.token_ids for c in done], sequences, llm.score(sequences))
    tokens, _, logits = seen[(1, 1)]
    for layout, (other_tokens, _, other) in seen.items():
        assert other_tokens == tokens, layout
        assert all(torch.equal(a, b) for a, b in zip(other, logits)), layout
