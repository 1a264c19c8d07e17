"""Cross-entropy over vocabulary-parallel logits, without ever gathering the full vocabulary.

Rank i holds logits z[:, span_i] of every token. With m = max_j z_j (all-reduced max),
Z = sum_j exp(z_j - m) (all-reduced sum) and the target logit z_t (all-reduced; only the rank
whose span holds t contributes), the loss of one token is

    nll = log Z - (z_t - m)

and with label smoothing eps (PyTorch's definition: the target distribution is
(1 - eps) onehot(t) + eps / V)

    loss = (1 - eps) nll + eps (log Z - sum_j (z_j - m) / V),

where sum_j (z_j - m) is all-reduced too. The gradient with respect to z_j is
softmax_j - (1 - eps) [j = t] - eps / V, computed locally from the saved local softmax.
Tokens whose target is ``ignore_index`` have loss 0 and gradient 0. Communication: three (four
with smoothing) all-reduces of one float per token, instead of an all-gather of V floats.
"""

from __future__ import annotations

import torch

from tensorpar.distributed.collectives import all_reduce, all_reduce_max
from tensorpar.distributed.groups import ParallelContext


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(fctx, logits, target, span, vocab_size, ctx, ignore_index, smoothing):
        # logits: [N, V_local], target: [N] -> loss: [N]
        logits = logits.float()
        m = all_reduce_max(logits.max(dim=-1).values, ctx)
        shifted = logits - m.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = all_reduce(exp.sum(dim=-1), ctx)
        valid = target != ignore_index
        mine = valid & (target >= span.start) & (target < span.stop)
        local_t = torch.where(mine, target - span.start, 0)
        z_t = torch.where(mine, shifted.gather(1, local_t.unsqueeze(1)).squeeze(1), 0.0)
        z_t = all_reduce(z_t, ctx)
        log_z = sum_exp.log()
        loss = log_z - z_t
        if smoothing:
            mean_shifted = all_reduce(shifted.sum(dim=-1), ctx) / vocab_size
            loss = (1 - smoothing) * loss + smoothing * (log_z - mean_shifted)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        fctx.save_for_backward(softmax, local_t, mine, valid)
        fctx.smoothing, fctx.vocab_size = smoothing, vocab_size
        return loss.masked_fill(~valid, 0.0)

    @staticmethod
    def backward(fctx, grad):
        softmax, local_t, mine, valid = fctx.saved_tensors
        g = softmax.clone()
        rows = mine.nonzero().squeeze(1)
        g[rows, local_t[rows]] -= 1 - fctx.smoothing
        if fctx.smoothing:
            g -= fctx.smoothing / fctx.vocab_size
        g *= (grad * valid).unsqueeze(-1)
        return g, None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    span: range,
    vocab_size: int,
    ctx: ParallelContext,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-token loss [...] from this rank's logits [..., len(span)] over vocabulary entries ``span``.

    Equals ``F.cross_entropy(full_logits, target, reduction="none", ignore_index=...,
    label_smoothing=...)`` on the gathered logits (see the module docstring for the math).
    """
    if logits.shape[-1] != len(span):
        raise ValueError(f"logits hold {logits.shape[-1]} vocabulary entries, the span {len(span)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    shape = target.shape
    loss = _VocabParallelCrossEntropy.apply(
        logits.reshape(-1, len(span)), target.reshape(-1), span, vocab_size, ctx, ignore_index, label_smoothing
    )
    return loss.view(shape)
