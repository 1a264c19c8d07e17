"""Helpers the tests share (imported as ``from helpers import ...``; fixtures stay in conftest.py)."""

from __future__ import annotations

from tensorpar.runtime.sampler import Sampled
from tensorpar.runtime.scheduler import SCORE, Scheduler, StepPlan

VOCAB = 50  # the hand-made model's vocabulary


def next_token(token: int) -> int:
    """The hand-made model: the token after ``token`` is ``(token + 1) % VOCAB``, with certainty."""
    return (token + 1) % VOCAB


def outcome(plan: StepPlan) -> list:
    """What the sampler would choose from the hand-made model's output for ``plan``: per row the
    next token with log-probability 0 (and itself as the top alternative where asked); for a
    scoring plan, each prompt token's log-probability 0 (the first None)."""
    if plan.kind == SCORE:
        prompt = plan.scoring[0].prompt_token_ids
        return [(prompt[0], None, [])] + [(t, 0.0, []) for t in prompt[1:]]
    return [None if seq is None else Sampled(next_token(row[-1]), 0.0,
                                             [(next_token(row[-1]), 0.0)] if seq.params.logprobs else [])
            for seq, row in zip(plan.rows, plan.message.ids)]


def step(sched: Scheduler) -> StepPlan | None:
    """One plan, scheduled and updated with its hand-made outcome."""
    plan = sched.schedule()
    if plan is not None:
        sched.update(plan, outcome(plan))
    return plan


def run_until_idle(sched: Scheduler, each=None, max_plans: int = 10_000) -> list[StepPlan]:
    """Every plan until nothing is left to do (``each(plan)`` after each); the plans, in order."""
    plans = []
    while sched.has_work():
        plan = step(sched)
        if plan is not None:
            plans.append(plan)
        if each is not None:
            each(plan)
        assert len(plans) < max_plans, "the scheduler makes no progress"
    return plans
