"""Faults injected on purpose, for tests that prove a check catches them (``EngineArgs.fault``).

- ``drop-all-reduce:L``: layer L's attention output projection returns each rank's partial sum
  without the all-reduce, so the residual stream after layer L differs between the ranks of a
  tensor-parallel group (nothing changes at TP=1).
"""

from __future__ import annotations

from tensorpar.errors import TensorparError

FAULTS = ("drop-all-reduce",)


def parse_fault(fault: str) -> tuple[str, int]:
    kind, _, layer = fault.partition(":")
    if kind not in FAULTS or not layer.isdigit():
        raise TensorparError(f"unknown fault {fault!r}: the test hooks are {', '.join(f + ':LAYER' for f in FAULTS)}")
    return kind, int(layer)


def apply_fault(model, fault: str) -> None:
    """Break ``model`` (this rank's shard) as ``fault`` says."""
    kind, layer = parse_fault(fault)
    if kind == "drop-all-reduce":
        model.model.layers[layer].self_attn.o_proj.reduce = False
