"""Speculative decoding (``--speculative-config``): greedy tokens are the target's own with an
n-gram proposer or a draft model at its own degree, beside preemption, prefix caching and logit
controls; sampled tokens keep the target's distribution (a chi-square test); the target as its
own draft accepts every draft; what cannot work is refused before any rank starts."""

from __future__ import annotations

import shutil

import pytest
import torch

from tensorpar import LLM
from tensorpar.errors import TensorparError
from tensorpar.runtime.sampling import SamplingParams
from tensorpar.runtime.spec import EngineArgs

# token ids of the tiny llama (vocabulary 250): the first two repeat themselves, as an edit of a passage does
PROMPTS = [[5, 17, 33, 8, 91, 40] * 3 + [5, 17], [7, 7, 100, 3, 150, 7, 100, 3], [1, 2, 3, 4],
           [200, 13, 57, 13, 57, 13]]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def draft(tiny_checkpoints, tmp_path_factory):
    """The tiny llama with noise added to every weight: a draft that is right often, not always."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("draft") / "llama"
    shutil.copytree(tiny_checkpoints["llama"], path)
    torch.manual_seed(1)
    for file in path.glob("*.safetensors"):
        weights = load_file(file)
        save_file({k: v + 0.1 * torch.randn_like(v) for k, v in weights.items()}, file, metadata={"format": "pt"})
    return str(path)


def params() -> list[SamplingParams]:
    plain = SamplingParams(max_new_tokens=24, ignore_eos=True)
    controlled = SamplingParams(max_new_tokens=24, ignore_eos=True, logprobs=2, repetition_penalty=1.3,
                                logit_bias=((9, 2.0),))
    return [plain, controlled, plain, plain]


@pytest.mark.timeout(300)
def test_greedy_tokens_are_the_targets_own_at_every_degree(tiny_checkpoints, draft, rank_pool):
    model = str(tiny_checkpoints["llama"])
    with LLM(model, tp=1, progress=False) as llm:
        want = llm.generate_full(PROMPTS, params()).completions
    runs = [(1, NGRAM, {}), (1, {"model": model, "num_speculative_tokens": 3}, {}),  # the target as its own draft
            (1, {**NGRAM, "disable_by_batch_size": 3}, {}),  # 4 sequences decode at once: no drafts
            (2, {"model": draft, "num_speculative_tokens": 3}, {}),  # the draft at tp=2 too (vLLM's default)
            (3, {"model": draft, "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}, {}),
            (3, {"model": draft, "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2}, {}),  # ranks 0, 1
            (3, NGRAM, {"max_model_len": 64, "kv_cache_memory": 8 * 4096})]  # (7 blocks of 4 KiB)
    for tp, config, options in runs:
        with LLM(model, tp=tp, speculative_config=config, progress=False, ranks=rank_pool(tp) if tp > 1 else None,
                 **options) as llm:
            result = llm.generate_full(PROMPTS, params())
            again = llm.generate_full(PROMPTS[:1], params()[:1])  # its prompt's blocks from the prefix cache now
        what = (tp, config, options)
        assert [c.token_ids for c in result.completions] == [c.token_ids for c in want], what
        assert again.completions[0].token_ids == want[0].token_ids and again.cache["prefix_cache_hits"] > 0
        got, ref = result.completions[1], want[1]
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=1e-4)
        assert [[t for t, _ in top] for top in got.top_logprobs] == [[t for t, _ in top] for top in ref.top_logprobs]
        s = result.speculation
        if "disable_by_batch_size" in config:
            assert s["draft_tokens"] == 0 and again.speculation["draft_tokens"] > 0
            continue
        assert s["draft_tokens"] > 0 and s["accepted_tokens"] > 0, what
        per_pos = s["accepted_per_position"]  # (the j-th draft is taken only after the ones before it)
        assert sum(per_pos) == s["accepted_tokens"] and per_pos == sorted(per_pos, reverse=True), per_pos
        if config.get("model") != draft:  # the repeating prompt alone: its 23 tokens after the first, several a step
            assert again.timings["decode_steps"] < 23, what
        if config.get("model") == model:
            assert s["acceptance_rate"] == 1.0
        if options:
            assert result.cache["preemptions"] > 0


@pytest.mark.timeout(200)
def test_sampled_tokens_keep_the_targets_distribution(tiny_checkpoints, draft):
    """2000 samples of 3 tokens (top-k 3, so 27 outcomes) with a draft model that is often wrong:
    a chi-square test against the target's exact probabilities of each sequence of 3."""
    model = str(tiny_checkpoints["llama"])
    prompt, top_k = [5, 17, 33, 8], 3
    sp = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=top_k, seed=0, n=2000, ignore_eos=True)
    with LLM(model, tp=1, progress=False, speculative_config={"model": draft, "num_speculative_tokens": 2}) as llm:
        result = llm.generate_full(prompt, sp)
        counts: dict[tuple, int] = {}
        for c in result.completions:
            counts[tuple(c.token_ids)] = counts.get(tuple(c.token_ids), 0) + 1
        probs = {}  # the target's probability of each outcome: top-k renormalized, position by position

        def walk(prefix: list[int], p: float) -> None:
            if len(prefix) == 3:
                probs[tuple(prefix)] = p
                return
            logits = llm.score([prompt + prefix])[0][-1]
            values, ids = torch.topk(logits, top_k)
            for t, q in zip(ids.tolist(), values.softmax(-1).tolist()):
                walk(prefix + [t], p * q)

        walk([], 1.0)
    assert set(counts) <= set(probs)
    observed = torch.tensor([float(counts.get(o, 0)) for o in probs])
    expected = torch.tensor(list(probs.values()), dtype=torch.float64) * len(result.completions)
    stat = float(((observed - expected) ** 2 / expected).sum())
    p_value = float(torch.special.gammaincc(torch.tensor((len(probs) - 1) / 2, dtype=torch.float64),
                                            torch.tensor(stat / 2, dtype=torch.float64)))
    assert p_value > 1e-3, (stat, p_value)
    s = result.speculation
    assert 0 < s["accepted_tokens"] < s["draft_tokens"]  # kept and rejected drafts both


def test_what_cannot_work_is_refused_before_any_rank_starts(tiny_checkpoints):
    llama, qwen = str(tiny_checkpoints["llama"]), str(tiny_checkpoints["qwen2"])
    with pytest.raises(TensorparError, match=r"^the draft model .* has a vocabulary of 301 tokens, the target .* 250: "
                                             r"a draft must share the target's vocabulary$"):
        EngineArgs(llama, speculative_config={"model": qwen, "num_speculative_tokens": 2}).resolve()
    with pytest.raises(TensorparError, match=r"draft_tensor_parallel_size 3: the draft runs on the first ranks of the "
                                             r"target's 2; give at most 2"):
        EngineArgs(llama, tp=2, speculative_config={"model": llama, "num_speculative_tokens": 2,
                                                    "draft_tensor_parallel_size": 3}).resolve()
    with pytest.raises(TensorparError, match="with --pp is not supported yet"):
        EngineArgs(llama, pp=2, speculative_config=NGRAM).resolve()
    with pytest.raises(TensorparError, match="unknown key"):
        EngineArgs(llama, speculative_config='{"method": "ngram", "k": 2}').resolve()


def test_an_elastic_restart_keeps_the_draft_within_the_ranks_left(tiny_checkpoints):
    from tensorpar.runtime.spec import one_rank_fewer

    args = EngineArgs(str(tiny_checkpoints["llama"]), tp=3, speculative_config={
        "model": str(tiny_checkpoints["llama"]), "num_speculative_tokens": 2, "draft_tensor_parallel_size": 3})
    smaller = one_rank_fewer(args, args.resolve().dims)
    assert smaller.tp == 2 and smaller.resolve().draft.dims.tp == 2
    ngram = one_rank_fewer(EngineArgs(args.model, tp=2, speculative_config=NGRAM), args.resolve().dims)
    assert ngram.speculative_config == NGRAM
