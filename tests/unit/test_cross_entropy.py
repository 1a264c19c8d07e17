"""Vocabulary-parallel cross-entropy on one rank equals F.cross_entropy (loss and gradient),
with ignore_index and label smoothing; multi-rank equality is in tests/integration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tensorpar.distributed.groups import single_process_context
from tensorpar.layers import vocab_parallel_cross_entropy


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_torch_cross_entropy(smoothing):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 17, generator=g) * 4).requires_grad_()
    target = torch.randint(0, 17, (3, 5), generator=g)
    target[0, :2] = -100
    ours = vocab_parallel_cross_entropy(logits, target, range(17), 17, single_process_context(),
                                        label_smoothing=smoothing)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.flatten(0, 1), target.flatten(), reduction="none", label_smoothing=smoothing)
    torch.testing.assert_close(ours.flatten(), ref, rtol=1e-6, atol=1e-6)
    assert ours[0, :2].eq(0).all()
    weights = torch.rand(3, 5, generator=g)
    (ours * weights).sum().backward()
    (ref * weights.flatten()).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)
    assert logits.grad[0, :2].eq(0).all()


def test_large_logits_do_not_overflow():
    logits = torch.tensor([[1000.0, 0.0, -1000.0]])
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([1]), range(3), 3, single_process_context())
    assert torch.isfinite(loss).all() and loss.item() == pytest.approx(1000.0)


def test_rejects_mismatched_span_and_bad_smoothing():
    ctx = single_process_context()
    with pytest.raises(ValueError, match="logits hold 4 vocabulary entries, the span 5"):
        vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), range(5), 5, ctx)
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), range(4), 4, ctx,
                                     label_smoothing=1.0)
