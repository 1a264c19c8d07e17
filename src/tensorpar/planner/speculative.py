"""Speculative decoding in the plan (``tensorpar plan --speculative-tokens K``): its time per
output token, and the degree its draft model should run at.

Each step, a sequence verifies its k drafts in one target step of k + 1 new tokens and keeps the
drafts up to the first one rejected, plus one token of the target's own. With each draft accepted
independently with probability a (``--acceptance``), a step yields on average

    E = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)          (k + 1 when a = 1)

tokens, and the time per output token is

    TPOT = (t_verify + k * t_draft) / E

where ``t_verify`` is the target's step over k + 1 tokens per sequence at its layout (decode is
bound by reading the weights, so it costs little more than a one-token step until the rows make
its products compute-bound), and ``t_draft`` one decode step of the draft model at its degree d,
on the first d ranks of the target's group (``runtime.speculative``): 0 for n-gram drafts. The
draft is small, so its step is mostly fixed costs and collectives: the degree that makes it
fastest is often below the target's, and the planner picks it (``--draft-tp`` fixes it).
"""

from __future__ import annotations

from dataclasses import dataclass

from tensorpar.planner.arch import ArchSpec
from tensorpar.planner.costs import Precision, Step, busiest_shard, decode_step
from tensorpar.planner.engines import Engine
from tensorpar.planner.hardware import Device
from tensorpar.planner.latency import Placement, step_time


@dataclass(frozen=True)
class Speculation:
    tokens_per_step: float  # E
    verify_ms: float  # the target's step over k + 1 tokens per sequence
    draft_ms: float  # one draft decode step (0 for n-gram drafts)
    draft_tp: int | None  # the draft's degree (None: n-gram)
    tpot_ms: float
    draft_ms_by_tp: dict  # each degree the draft could run at: its step

    def to_json(self) -> dict:
        return {"tokens_per_step": round(self.tokens_per_step, 3), "verify_ms": round(self.verify_ms, 4),
                "draft_ms": round(self.draft_ms, 4), "draft_tp": self.draft_tp, "tpot_ms": round(self.tpot_ms, 4),
                "draft_ms_by_tp": {str(d): round(t, 4) for d, t in self.draft_ms_by_tp.items()}}


def tokens_per_step(k: int, acceptance: float) -> float:
    """E, the tokens a verifying step yields on average (module docstring)."""
    return k + 1.0 if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


def _decode_ms(arch: ArchSpec, tp: int, step: Step, precision: Precision, device: Device, gpus_per_node: int,
               engine: Engine | None) -> float:
    place = Placement(tp, 1, 1, 1, gpus_per_node)
    t = step_time(arch, busiest_shard(arch, tp), step, precision, device, place, logit_rows=step.tokens,
                  engine=engine)
    return t.through_all * 1e3


def speculation(arch: ArchSpec, tp: int, draft: ArchSpec | None, draft_tp: int | None, k: int, acceptance: float,
                batch: int, context: int, precision: Precision, device: Device, gpus_per_node: int,
                engine: Engine | None) -> Speculation:
    """TPOT of a target at ``tp`` (one stage) with k drafts per step from ``draft`` (None: n-gram)
    at ``draft_tp``, or at the degree from 1 to ``tp`` that makes its step fastest (``draft_tp`` None)."""
    verify = _decode_ms(arch, tp, Step(batch, k + 1, context, context), precision, device, gpus_per_node, engine)
    by_tp: dict[int, float] = {}
    if draft is not None:
        degrees = [draft_tp] if draft_tp else [d for d in range(1, tp + 1) if d <= draft.heads]
        by_tp = {d: _decode_ms(draft, d, decode_step(batch, context), precision, device, gpus_per_node, engine)
                 for d in degrees}
    best = min(by_tp, key=by_tp.get) if by_tp else None
    t_draft = by_tp[best] if by_tp else 0.0
    e = tokens_per_step(k, acceptance)
    return Speculation(e, verify, t_draft, best, (verify + k * t_draft) / e, by_tp)
