"""The optimizer's controls: AdamW with weight decay on matrices only, the learning-rate schedule,
and the global gradient norm (for ``--clip-grad-norm``) with every element counted once.

The learning rate of optimizer step s (1 .. T), with ``warmup`` steps W, peak ``lr`` and floor
``min_lr`` (Megatron-Core's and torchtitan's shapes):

    s <= W:      lr * s / W                                           (linear warm-up)
    constant:    lr
    linear:      min_lr + (lr - min_lr) * (T - s) / (T - W)
    cosine:      min_lr + (lr - min_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2

The global norm is sqrt(sum of g^2 over every element of every full parameter). Ranks hold some
elements more than once: a replicated tensor (a norm weight) on every tensor-parallel rank, a KV
head on each rank whose query heads share it. A rank counts an element only where no lower rank of
its group holds it (``owned_views``), so the sum over the group is the single-process sum, at any
degree. Pipeline stages hold different layers: their sums are added over the pipeline group, the
tied embedding counted on the first stage only (``pipeline.tied_copy``). Data-parallel replicas
hold equal gradients after synchronization: they need no sum.
"""

from __future__ import annotations

import math

import torch

from tensorpar.distributed.collectives import all_gather_object, all_reduce
from tensorpar.layers.pieces import trainable_pieces
from tensorpar.train.pipeline import tied_copy

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, lr: float, steps: int, schedule: str = "constant", warmup: int = 0, min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (module docstring)."""
    if warmup and step <= warmup:
        return lr * step / warmup
    if schedule == "constant" or steps <= warmup:
        return lr
    done = (step - warmup) / (steps - warmup)
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1 - done)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * done)) / 2


def adamw(model, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW whose weight decay reaches only matrices (projections, embeddings): norm weights and
    biases (1-D parameters) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def _minus(span: tuple[int, int], others: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``span`` that none of ``others`` covers."""
    left = [span]
    for a, b in others:
        left = [piece for s, e in left for piece in ((s, min(e, a)), (max(s, b), e)) if piece[0] < piece[1]]
    return left


class GlobalNorm:
    """The global gradient norm of a sharded model (module docstring); collective over ``tp`` (and
    the pipeline group ``pp``, if any)."""

    def __init__(self, model, tp, pp=None):
        self.tp, self.pp = tp, pp
        pieces = [(pp.param, pc, pp.full_name(pc)) for pp in trainable_pieces(model) for pc in pp.pieces
                  if pc.part is not None and not tied_copy(model, pp.param)]
        mine = [(name, pc.axis, (pc.span.start, pc.span.stop) if pc.axis is not None else None)
                for _, pc, name in pieces]
        lower: dict[str, list] = {}  # what ranks below this one hold, by tensor
        for rank_pieces in all_gather_object(mine, tp)[: tp.rank]:
            for name, axis, span in rank_pieces:
                lower.setdefault(name, []).append(span)
        self.owned = []  # (parameter, piece, axis, [(start, stop) within the piece's own span])
        for param, pc, name in pieces:
            if pc.axis is None:
                if name not in lower:
                    self.owned.append((param, pc, None, None))
                continue
            start = pc.span.start
            spans = _minus((pc.span.start, pc.span.stop), [s for s in lower.get(name, []) if s is not None])
            if spans:
                self.owned.append((param, pc, pc.axis, [(a - start, b - start) for a, b in spans]))

    def __call__(self) -> float:
        """sqrt(sum of squares) of the gradients, each element once, on every rank."""
        total = torch.zeros((), dtype=torch.float64, device=self.owned[0][0].device if self.owned else "cpu")
        for param, pc, axis, spans in self.owned:
            view = pc.local_view(param.grad)
            parts = [view] if axis is None else [view.narrow(axis, a, b - a) for a, b in spans]
            for part in parts:
                total += part.double().pow(2).sum()
        total = all_reduce(total.float(), self.tp)  # (float32 on the wire: shared memory's)
        return math.sqrt(float(total if self.pp is None else all_reduce(total, self.pp)))
