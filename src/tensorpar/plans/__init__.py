"""Sharding plans (data, one per architecture module: ``PLAN``) and ``apply_plan``, which rewrites
a plain model by one."""

from tensorpar.plans.apply import STYLES, apply_plan, set_sequence_parallel, tie_embeddings

__all__ = ["STYLES", "apply_plan", "set_sequence_parallel", "tie_embeddings"]
