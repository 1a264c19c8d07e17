"""Speculative decoding's parts that need no model: vLLM's configuration, prompt lookup, and the
acceptance rule (its output distribution is the target's, checked by a chi-square test)."""

from __future__ import annotations

import pytest
import torch

from tensorpar.errors import TensorparError
from tensorpar.runtime.sampling import accept_drafts
from tensorpar.runtime.speculative import SpeculativeConfig, ngram_drafts, speculation_summary


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of observed ``counts`` under ``probs`` (Pearson's test; cells of p > 0)."""
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    expected = probs[keep] * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2))


def test_the_configuration_is_read_as_vllm_spells_it():
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, '
                                '"prompt_lookup_min": 2}')
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == ("ngram", 4, 2, 4)
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3}).prompt_lookup_min == 5  # (vLLM's)
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}) \
        .prompt_lookup_min == 3
    d = SpeculativeConfig.parse({"model": "smollm2-135m", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1})
    assert (d.method, d.model, d.draft_tensor_parallel_size) == ("draft_model", "smollm2-135m", 1)
    assert SpeculativeConfig.parse(None) is None


@pytest.mark.parametrize("given, says", [
    ("{not json", "must be a JSON object"),
    ('["ngram"]', "must be a JSON object, got list"),
    ({"method": "ngram", "num_speculative_tokens": 4, "typo": 1}, "unknown key.*typo"),
    ({"method": "eagle", "num_speculative_tokens": 4}, "method 'eagle' is not supported"),
    ({"method": "ngram"}, "num_speculative_tokens must be an integer from 1 to 16, got None"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "from 1 to 16, got 0"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "1 <= min <= max"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs \"model\""),
    ({"model": "x", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 0}, "draft_tensor_parallel_size"),
    ({"model": "x", "num_speculative_tokens": 2, "prompt_lookup_min": 2}, "are for method ngram"),
])
def test_a_bad_configuration_is_refused_in_one_line(given, says):
    with pytest.raises(TensorparError, match=says):
        SpeculativeConfig.parse(given)


def test_prompt_lookup_follows_the_longest_suffix_seen_before_latest_first():
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 2, 3, 4]
    assert ngram_drafts(tokens, 2, 3, 3) == [7, 8, 2]  # "2 3 4" last occurred before "7 8 2"
    assert ngram_drafts(tokens, 2, 3, 9) == [7, 8, 2, 3, 4]  # (up to the end of the sequence)
    assert ngram_drafts([5, 6, 7, 1, 6, 7], 2, 2, 2) == [1, 6]
    assert ngram_drafts([5, 6, 7, 1, 2, 7], 2, 4, 2) == []  # "2 7" never occurred before; 1-grams not looked up
    assert ngram_drafts([5, 6, 7, 1, 2, 7], 1, 4, 2) == [1, 2]
    assert ngram_drafts([3], 1, 4, 2) == []


def test_the_summary_is_vllms_acceptance_rate_and_mean_length():
    s = speculation_summary({"spec_drafts": 4, "spec_draft_tokens": 16, "spec_accepted_tokens": 10})
    assert s["acceptance_rate"] == 10 / 16 and s["mean_acceptance_length"] == 1 + 10 / 4
    assert speculation_summary({})["acceptance_rate"] == 0.0


@pytest.mark.parametrize("proposal", ["draft model", "ngram"])
def test_accepted_tokens_are_distributed_as_the_targets_own(proposal):
    """Drafts from q (or certain ones, an n-gram's), accepted against p: the first token taken is
    distributed as p_0, the second (when the first draft was kept) as p_1, whatever q is."""
    torch.manual_seed(0)
    vocab, k, n = 6, 2, 20000
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1, 0.0], [0.05, 0.05, 0.3, 0.3, 0.2, 0.1], [1 / 6] * 6])
    q = torch.tensor([[0.1, 0.1, 0.4, 0.2, 0.1, 0.1], [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]])
    g = torch.Generator().manual_seed(1)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    kept = 0
    for _ in range(n):
        if proposal == "ngram":
            drafts = [3, 2]  # always the same guess
            taken = accept_drafts(drafts, p, None, g)
        else:
            drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)]
            taken = accept_drafts(drafts, p, q, g)
        assert 1 <= len(taken) <= k + 1 and taken[:-1] == drafts[: len(taken) - 1]
        first[taken[0]] += 1
        if taken[0] == drafts[0]:
            kept += 1
            second[taken[1]] += 1
    assert chi_square_p(first, p[0]) > 1e-3
    assert chi_square_p(second, p[1]) > 1e-3
    assert 0 < kept < n  # both acceptance and rejection happened
