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
from tensorpar.runtime.sampling import accept_drafts, apply_controls, probabilities, sample
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
        """Per output row of a model step, a ``Sampled`` (None for a row that yields no token); a
        sequence verifying drafts (``plan.drafts``) has a row per position: its first gets the list
        of tokens it takes (``accept``), the others None. For a ``SCORE`` plan, the prompt's
        log-probabilities (``score_prompt``)."""
        if plan.kind == SCORE:
            request, _ = plan.scoring
            return score_prompt(out.logits, request.prompt_token_ids, request.params.prompt_logprobs)
        rows = plan.rows
        if out.ids is not None:  # GREEDY: the ranks chose
            return self.accept(plan, [None if seq is None else Sampled(token, logprob)
                                      for seq, token, logprob in zip(rows, out.ids.tolist(), out.logprobs.tolist())])
        logits = out.logits.float()  # [rows, vocab]
        norm = logsumexp(logits).tolist()  # log-prob = logit - logsumexp(logits)
        live = [row for row, seq in enumerate(rows) if seq is not None]
        before = _drafted_before(rows, plan.drafts)  # each row's drafts ahead of its position
        chosen = logits  # what the choice is made from: the logits after each row's controls
        if any(rows[row].params.controls_logits for row in live):
            chosen = logits.clone()
            chosen[live] = apply_controls(logits[live], [rows[r].params for r in live],
                                          [rows[r].request.prompt_token_ids for r in live],
                                          [rows[r].out + before[r] for r in live],
                                          [set() if rows[r].params.ignore_eos else self.eos_ids for r in live])
            for row in live:
                if rows[row].guided is not None:  # the grammar has the last word (after the drafts before the row)
                    with rows[row].guided.ahead(before[row]) as grammar:
                        grammar.mask_(chosen[row])
        best = chosen.argmax(dim=-1).tolist()  # every greedy row at once

        def made(row: int, token: int) -> Sampled:
            p, top = rows[row].params, []
            if p.logprobs:
                values, ids = torch.topk(logits[row], p.logprobs)
                top = [(i, v - norm[row]) for i, v in zip(ids.tolist(), values.tolist())]
            return Sampled(token, float(logits[row, token]) - norm[row], top)

        choices: list = []
        for row, seq in enumerate(rows):
            if seq is None or (before[row] and not seq.params.greedy):  # (a sampled span's first row decides)
                choices.append(None)
            elif seq.request_id in plan.drafts and not seq.params.greedy:
                drafts = plan.drafts[seq.request_id]
                span = range(row, row + len(drafts) + 1)
                target = torch.stack([probabilities(chosen[r], seq.params) for r in span])
                taken = accept_drafts(drafts, target, seq.draft_probs, seq.generator)
                choices.append([made(r, t) for r, t in zip(span, taken)])
            else:
                choices.append(made(row, best[row] if seq.params.greedy else sample(chosen[row], seq.params,
                                                                                     seq.generator)))
        return self.accept(plan, choices)

    @staticmethod
    def accept(plan: StepPlan, choices: list) -> list:
        """Greedy verification: a span's tokens are its drafts as far as the target's own choices
        agree, then the target's choice at the first disagreement (or one past the last draft)."""
        for row, seq in enumerate(plan.rows):
            if seq is None or choices[row] is None or isinstance(choices[row], list) or seq.request_id not in plan.drafts:
                continue
            drafts = plan.drafts[seq.request_id]
            agree = 0
            while agree < len(drafts) and choices[row + agree].token == drafts[agree]:
                agree += 1
            choices[row : row + len(drafts) + 1] = [choices[row : row + agree + 1]] + [None] * len(drafts)
        return choices


def _drafted_before(rows: list, drafts: dict[str, list[int]]) -> list[list[int]]:
    """Per output row, the drafts its sequence has at earlier positions of the step: [] for a
    plain row and for the first of a span, then ``drafts[:1]``, ``drafts[:2]``, ..."""
    out, prev, j = [], None, 0
    for seq in rows:
        j = j + 1 if seq is not None and seq is prev else 0
        prev = seq
        out.append(drafts[seq.request_id][:j] if j else [])
    return out
