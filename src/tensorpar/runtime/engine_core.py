"""One engine step on the leader, as vLLM's ``EngineCore.step`` reads:

    plan = scheduler.schedule()            # what to run (data)
    out = runner.execute(plan.message)     # every rank runs it; the leader gets a StepOutput
    scheduler.update(plan, sampler.choose(out, plan))
    proposer.propose_for(decoding ones)    # speculative decoding: drafts the next plan verifies

``Worker.generate`` drains it inside one collective call; ``ServingEngine`` steps it on a thread.
"""

from __future__ import annotations

import time

from tensorpar.runtime.model_runner import ModelRunner
from tensorpar.runtime.request import Request
from tensorpar.runtime.sampler import Sampler
from tensorpar.runtime.sampling import SamplingParams
from tensorpar.runtime.scheduler import DECODE, SCORE, Scheduler, score_plan


class EngineCore:
    """``proposer``: a speculative decoding proposer (``runtime.speculative``), or None.
    ``timings``: seconds and steps of prefill and decode; ``decode_positions`` sums each decode
    step's tokens per sequence (1 without speculation), so that ``decode_s / decode_positions`` is
    the time a sequence waits per token."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, sampler: Sampler, proposer=None):
        self.runner, self.scheduler, self.sampler, self.proposer = runner, scheduler, sampler, proposer
        self.timings = {"prefill_s": 0.0, "prefill_steps": 0, "decode_s": 0.0, "decode_steps": 0,
                        "decode_positions": 0.0}

    def step(self) -> None:
        """Schedule, execute, sample, update, propose: one plan, if anything can run."""
        plan = self.scheduler.schedule()
        if plan is None:
            return
        t = time.perf_counter()
        out = self.runner.execute(plan.message)
        appended = self.scheduler.update(plan, self.sampler.choose(out, plan))
        if self.proposer is not None and plan.kind != SCORE:
            sched = self.scheduler
            self.proposer.propose_for([s for s in sched.running.values() if s.decoding],
                                  set(sched.running) | {s.request_id for s in sched.preempted})
        kind = DECODE if plan.kind == DECODE else "prefill"  # (scoring counts as prefill time, not steps)
        self.timings[f"{kind}_s"] += time.perf_counter() - t
        if plan.kind != SCORE:
            self.timings[f"{kind}_steps"] += 1
        if plan.kind == DECODE:
            self.timings["decode_positions"] += appended / len({id(s) for s in plan.rows})

    def reserve(self, sequences: int, tokens: int) -> None:
        """A KV cache on every rank with room for ``sequences`` sequences of ``tokens`` positions
        (``Scheduler.reserve``); its memory becomes resident as it is used."""
        blocks = self.scheduler.reserve(sequences, tokens)
        if blocks is not None:
            self.runner.allocate(blocks, self.scheduler.block_size)
            if self.proposer is not None:
                self.proposer.allocate(blocks, self.scheduler.block_size)

    def load_weights(self, checked: str) -> float:
        """The weights of the checkpoint ``checked`` (``ModelRunner.checked_weights``) in place of
        these on every rank (``ModelRunner.load_weights``), while no sequence runs, and the prefix
        cache forgotten; seconds taken."""
        if self.scheduler.running or self.scheduler.preempted:
            raise RuntimeError("weights are replaced only while no sequence runs")
        t = time.perf_counter()
        self.runner.load_weights(checked)
        if self.scheduler.blocks is not None:
            self.scheduler.blocks.forget_prefixes()
        return time.perf_counter() - t

    def score(self, prompt: list[int]):
        """Full-vocabulary logits at every position of ``prompt``: [len(prompt), vocab]."""
        plan = score_plan(Request("score", prompt, SamplingParams(max_new_tokens=0)))
        return self.runner.execute(plan.message).logits

    def stats(self) -> dict:
        """The scheduler's counts and each MoE layer's expert loads."""
        return {**self.scheduler.stats(), "experts": self.runner.expert_load()}
