"""Per-architecture sharding plans (data) and ``apply_plan``, which rewrites a model by them."""

from tensorpar.plans.apply import STYLES, apply_plan, set_sequence_parallel
from tensorpar.plans.llama import LLAMA_PLAN

PLANS: dict[str, dict[str, str]] = {"llama": LLAMA_PLAN, "mistral": LLAMA_PLAN, "qwen2": LLAMA_PLAN}


def plan_for(architecture: str) -> dict[str, str]:
    try:
        return PLANS[architecture]
    except KeyError:
        raise ValueError(
            f"no sharding plan for architecture {architecture!r}; known: {', '.join(sorted(PLANS))}"
        ) from None


__all__ = ["PLANS", "STYLES", "apply_plan", "plan_for", "set_sequence_parallel"]
