"""Choosing each row's token from a step's output, on the leader: ``Sampler.choose``.

For a ``GREEDY`` step the ranks already chose (each row's argmax and its log-probability). For a
``FULL`` step, per row: the controls reshape the logits (``sampling.apply_controls``: logit bias,
penalties, a minimum length), a guided sequence's grammar masks them last
(``runtime.guided``), then the token is the argmax (greedy) or a sample
(``sampling.sample``). The reported log-probability is the model's own,
log p(token) = logit(token) - logsumexp(logits), before any control, as are the ``logprobs``
most likely alternatives. A ``SCORE`` plan's output becomes the prompt's log-probabilities
(``request.score_prompt``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tensorpar.runtime.messages import StepOutput
from tensorpar.runtime.request import logsumexp, score_prompt
from tensorpar.runtime.sampling import apply_controls, sample
from tensorpar.runtime.scheduler import SCORE, StepPlan


@dataclass(frozen=True)
class Sampled:
    """One row's choice: the ``token``, its ``logprob`` under the model, and the ``top`` most
    likely (token, log-probability) pairs its request asked for."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """``eos_ids``: the end tokens a minimum length (``min_tokens``) holds back."""

    def __init__(self, eos_ids: set[int]):
        self.eos_ids = eos_ids

    def choose(self, out: StepOutput, plan: StepPlan) -> list:
        """Per row of a model step, a ``Sampled`` (None for a row that yields no token); for a
        ``SCORE`` plan, the prompt's log-probabilities (``score_prompt``)."""
        if plan.kind == SCORE:
            request, _ = plan.scoring
            return score_prompt(out.logits, request.prompt_token_ids, request.params.prompt_logprobs)
        rows = plan.rows
        if out.ids is not None:  # GREEDY: the ranks chose
            return [None if seq is None else Sampled(token, logprob)
                    for seq, token, logprob in zip(rows, out.ids.tolist(), out.logprobs.tolist())]
        logits = out.logits.float()  # [B, vocab]
        norm = logsumexp(logits).tolist()  # log-prob = logit - logsumexp(logits)
        live = [row for row, seq in enumerate(rows) if seq is not None]
        chosen = logits  # what the choice is made from: the logits after each row's controls
        if any(rows[row].params.controls_logits for row in live):
            chosen = logits.clone()
            chosen[live] = apply_controls(logits[live], [rows[r].params for r in live],
                                          [rows[r].request.prompt_token_ids for r in live], [rows[r].out for r in live],
                                          [set() if rows[r].params.ignore_eos else self.eos_ids for r in live])
            for row in live:
                if rows[row].guided is not None:  # the grammar has the last word
                    rows[row].guided.mask_(chosen[row])
        best = chosen.argmax(dim=-1).tolist()  # every greedy row at once
        choices: list[Sampled | None] = []
        for row, seq in enumerate(rows):
            if seq is None:
                choices.append(None)
                continue
            p = seq.params
            token = best[row] if p.greedy else sample(chosen[row], p, seq.generator)
            top = []
            if p.logprobs:
                values, ids = torch.topk(logits[row], p.logprobs)
                top = [(i, v - norm[row]) for i, v in zip(ids.tolist(), values.tolist())]
            choices.append(Sampled(token, float(logits[row, token]) - norm[row], top))
        return choices
