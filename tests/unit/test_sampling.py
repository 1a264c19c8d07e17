"""``SamplingParams`` validation and ``sample``: greedy, temperature, top-k and top-p."""

from __future__ import annotations

import pytest
import torch

from tensorpar.runtime.sampling import SamplingParams, sample


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_p=-0.5), "top_p"),
        (dict(top_k=-1), "top_k"),
    ],
)
def test_invalid_params_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_valid_params_and_defaults():
    p = SamplingParams()
    assert p.greedy and p.max_new_tokens == 32 and p.top_p == 1.0 and p.top_k == 0
    q = SamplingParams(max_new_tokens=1, temperature=0.7, top_p=1.0, top_k=0)
    assert not q.greedy
    assert SamplingParams(top_p=1e-9).top_p == 1e-9
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=("a", "", "b")).stop == ("a", "b")


def random_logits(seed: int, vocab: int = 50) -> torch.Tensor:
    return torch.randn(vocab, generator=gen(seed)) * 3


def test_greedy_is_argmax():
    for seed in range(20):
        logits = random_logits(seed)
        assert sample(logits, SamplingParams(), None) == int(logits.argmax())
        # a generator is irrelevant to greedy decoding
        assert sample(logits, SamplingParams(top_k=3, top_p=0.5), gen(seed)) == int(logits.argmax())
    logits = torch.full((10,), -5.0)
    logits[7] = 4.0
    assert sample(logits, SamplingParams(), None) == 7


@pytest.mark.parametrize("temperature", [1e-3, 0.5, 1.0, 2.0, 100.0, 1e4])
def test_top_k_one_is_argmax_at_any_temperature(temperature):
    g = gen(0)
    for seed in range(25):
        logits = random_logits(seed)
        params = SamplingParams(temperature=temperature, top_k=1)
        assert sample(logits, params, g) == int(logits.argmax())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_tiny_top_p_is_argmax(temperature):
    g = gen(1)
    for seed in range(25):
        logits = random_logits(seed)
        assert sample(logits, SamplingParams(temperature=temperature, top_p=1e-6), g) == int(logits.argmax())


def test_top_k_restricts_to_the_k_largest():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8, 0.5])
    allowed = {1, 2, 4}
    g = gen(2)
    draws = {sample(logits, SamplingParams(temperature=5.0, top_k=3), g) for _ in range(300)}
    assert draws == allowed  # high temperature: all three are drawn, never anything else


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    g = gen(3)
    # mass before token 1 is 0.5 < 0.7, before token 2 it is 0.8 >= 0.7: tokens {0, 1} remain
    draws = [sample(logits, SamplingParams(temperature=1.0, top_p=0.7), g) for _ in range(2000)]
    assert set(draws) == {0, 1}
    frac0 = draws.count(0) / len(draws)
    assert abs(frac0 - 0.5 / 0.8) < 0.04


def test_same_seed_same_draws():
    logits = random_logits(4, vocab=30) / 3
    params = SamplingParams(temperature=1.3, top_p=0.95, top_k=20)
    a = [sample(logits, params, g) for g in [gen(123)] for _ in range(200)]
    b = [sample(logits, params, g) for g in [gen(123)] for _ in range(200)]
    c = [sample(logits, params, g) for g in [gen(124)] for _ in range(200)]
    assert a == b
    assert a != c
    assert len(set(a)) > 5  # it really samples


def test_frequencies_match_softmax():
    logits = torch.tensor([1.0, 0.2, -0.5, 1.5])
    want = logits.softmax(-1)
    g = gen(5)
    n = 4000
    draws = torch.tensor([sample(logits, SamplingParams(temperature=1.0), g) for _ in range(n)])
    freq = torch.bincount(draws, minlength=4).float() / n
    assert (freq - want).abs().max() < 0.03, (freq, want)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    n = 3000
    for t in (0.5, 2.0):
        want = (logits / t).softmax(-1)
        g = gen(int(t * 10))
        draws = torch.tensor([sample(logits, SamplingParams(temperature=t), g) for _ in range(n)])
        freq = torch.bincount(draws, minlength=4).float() / n
        assert (freq - want).abs().max() < 0.03, (t, freq, want)


def test_each_control_reshapes_the_logits_as_defined():
    from tensorpar.runtime.sampling import apply_controls

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]] * 6)
    prompt, out = [0], [2, 2, 3]
    params = [SamplingParams(),  # no control: untouched
              SamplingParams(logit_bias=((1, 5.0), (4, -100.0))),
              SamplingParams(repetition_penalty=2.0),
              SamplingParams(presence_penalty=0.5),
              SamplingParams(frequency_penalty=0.25),
              SamplingParams(min_tokens=5, stop_token_ids=(3,))]
    got = apply_controls(logits, params, [prompt] * 6, [out] * 6, [{4}] * 6)
    assert torch.equal(got[0], logits[0])
    assert got[1].tolist() == [2.0, 4.0, 0.5, 3.0, -102.0]
    assert got[2].tolist() == [1.0, -1.0, 0.25, 1.5, -2.0]  # seen: 0 (prompt), 2 and 3 (output); 1 and 4 unseen
    assert got[3].tolist() == [2.0, -1.0, 0.0, 2.5, -2.0]  # once per token generated
    assert got[4].tolist() == [2.0, -1.0, 0.0, 2.75, -2.0]  # once per time generated (2 twice, 3 once)
    assert got[5].tolist() == [2.0, -1.0, 0.5, float("-inf"), float("-inf")]  # EOS (4) and stop token 3 held back
    again = apply_controls(logits, params[5:], [prompt], [out + [1, 1]], [{4}])  # 5 tokens: no longer held back
    assert torch.equal(again[0], logits[5])


def test_allowed_tokens_and_bad_words_bar_the_rest():
    from tensorpar.runtime.sampling import apply_controls

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]] * 3)
    inf = float("-inf")
    params = [SamplingParams(allowed_token_ids=(1, 2)),
              SamplingParams(bad_words=((3,), (2, 4))),  # 3 always; 4 only right after a 2
              SamplingParams(bad_words=((1, 0),))]
    got = apply_controls(logits, params, [[0]] * 3, [[2], [2], [2]], [set()] * 3)
    assert got[0].tolist() == [inf, -1.0, 0.5, inf, inf]
    assert got[1].tolist() == [2.0, -1.0, 0.5, inf, inf]
    assert torch.equal(got[2], logits[2])  # the output does not end with 1: 0 stays possible
    assert apply_controls(logits[:1], params[1:2], [[0]], [[2, 1]], [set()])[0].tolist() == [2.0, -1.0, 0.5, inf, -2.0]


def test_min_p_keeps_only_tokens_near_the_most_likely():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(temperature=1.0, min_p=0.5)  # keeps p >= 0.25: tokens 0 and 1
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, p, g) for _ in range(300)} == {0, 1}


@pytest.mark.parametrize("kwargs, field", [(dict(presence_penalty=3), "presence_penalty"),
                                           (dict(frequency_penalty=-2.5), "frequency_penalty"),
                                           (dict(repetition_penalty=0), "repetition_penalty"),
                                           (dict(min_p=1.5), "min_p"),
                                           (dict(min_tokens=40, max_new_tokens=32), "min_tokens")])
def test_invalid_controls_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
