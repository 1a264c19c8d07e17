"""``tensorpar check``'s verdicts from logits, without processes."""

from __future__ import annotations

import torch

from tensorpar.runtime.check import compare, tolerance


def _logits(positions: int, vocab: int, best: list[int], margin: float = 5.0) -> torch.Tensor:
    """Logits whose argmax at position i is best[i] (by ``margin``) and 0 elsewhere."""
    x = torch.zeros(positions, vocab)
    for i, b in enumerate(best):
        x[i, b] = margin
    return x


def test_equal_logits_and_tokens_pass():
    want = _logits(6, 10, [1, 2, 3, 4, 5, 6])
    r = compare("p", 3, [3, 4, 5], want.clone(), want, 1e-4, 0.01)  # positions 2, 3, 4 predict 3, 4, 5
    assert (r.verdict, r.first_divergence, r.max_rel_error) == ("ok", None, 0.0)


def test_an_error_above_the_tolerance_is_a_mismatch():
    want = _logits(6, 10, [1, 2, 3, 4, 5, 6])
    got = want.clone()
    got[0, 9] = 0.01  # 0.2% of the largest logit
    assert compare("p", 3, [3, 4, 5], got, want, 1e-4, 0.01).verdict == "MISMATCH"
    assert compare("p", 3, [3, 4, 5], got, want, 1e-2, 0.01).verdict == "ok"


def test_a_divergence_is_a_near_tie_only_where_the_reference_is_unsure():
    want = _logits(6, 10, [1, 2, 3, 4, 5, 6])
    want[3, 7] = 5.0 - 0.004  # position 3 predicts completion token 1: 4, by a hair over 7
    r = compare("p", 3, [3, 7, 5], want.clone(), want, 1e-4, 0.01)
    assert (r.verdict, r.first_divergence) == ("near-tie", 1) and abs(r.margin - 0.004) < 1e-6
    sure = _logits(6, 10, [1, 2, 3, 4, 5, 6])
    r = compare("p", 3, [3, 7, 5], sure.clone(), sure, 1e-4, 0.01)
    assert (r.verdict, r.first_divergence, r.margin) == ("MISMATCH", 1, 5.0)


def test_tolerances_by_dtype_and_quantization():
    assert tolerance("fp32", "none") == (1e-4, 0.01)
    assert tolerance("fp32", "int4")[0] > tolerance("fp32", "int8")[0] > tolerance("bf16", "none")[0]
