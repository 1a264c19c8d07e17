"""The parallel layout of one run, resolved and checked once, before any rank starts.

``ParallelDims`` is built in the process that launches (from the model's config and the user's
flags, or from ``torchrun``'s world size), carried to every rank inside the run's spec, and
trusted there. A pipeline stage is a group of ``width`` ranks: ``tp`` of them split attention
(and the dense parts), and a mixture of experts is placed over the same ranks in ``ep`` sets
(``tp`` a multiple of ``ep``: each expert split over ``tp / ep`` ranks; or ``tp=1``: attention
replicated on the ``ep`` ranks). The world is ``width * pp * dp`` ranks.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensorpar.errors import TensorparError
from tensorpar.partition import check_degree


@dataclass(frozen=True)
class ParallelDims:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "ep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TensorparError(f"--{name} must be a positive integer, got {value!r}")

    @property
    def width(self) -> int:
        """Ranks of one pipeline stage: ``tp``, or ``ep`` where attention is replicated (tp=1)."""
        return max(self.tp, self.ep)

    @property
    def world_size(self) -> int:
        return self.width * self.pp * self.dp

    @property
    def replica_size(self) -> int:
        """Ranks of one replica: ``width * pp`` (each data-parallel replica is its own process group)."""
        return self.width * self.pp

    def describe(self) -> str:
        """``tp=2``, ``tp=2 pp=2``: the dimensions above 1 beside tp."""
        return " ".join([f"tp={self.tp}"] + [f"{n}={getattr(self, n)}" for n in ("pp", "dp", "ep") if getattr(self, n) > 1])

    def describe_nodes(self, per_node: int | None) -> str:
        """``describe`` for ranks spread over nodes of ``per_node`` ranks (adjacent ranks share a
        node, as torchrun numbers them; tp varies fastest, then pp, then dp):
        ``tp=2 within each node, pp=2 across 2 nodes``."""
        nodes = self.world_size // per_node if per_node else 1
        if nodes <= 1:
            return self.describe()
        parts, span = [], 1
        for name in ("tp", "pp", "dp"):
            value = self.width if name == "tp" else getattr(self, name)
            span *= value
            value = getattr(self, name)
            if value > 1 or name == "tp":
                where = "within each node" if per_node % span == 0 else f"across {nodes} nodes"
                parts.append(f"{name}={value} {where}")
        return ", ".join(parts)

    def place(self, rank: int) -> str:
        """Where ``rank`` (of one replica) sits, for messages: ``stage 1 of 2, tp rank 0 of 2``,
        ``tp rank 1 of 2, expert set 1 of 2`` ("" without stages or experts)."""
        if self.pp == 1 and self.ep == 1:
            return ""
        stage, t = self.coordinates(rank)
        parts = [f"stage {stage} of {self.pp}"] if self.pp > 1 else []
        if self.tp > 1 or self.ep == 1:
            parts.append(f"tp rank {t} of {self.tp}")
        if self.ep > 1:
            parts.append(f"expert set {t // (self.width // self.ep)} of {self.ep}")
        return ", ".join(parts)

    def coordinates(self, rank: int) -> tuple[int, int]:
        """(pipeline stage, index within the stage) of ``rank``: a stage's ranks are adjacent."""
        return divmod(rank, self.width)

    @classmethod
    def resolve(
        cls,
        num_heads: int,
        tp: int | None = None,
        dp: int = 1,
        torchrun_world_size: int | None = None,
        supported: tuple[str, ...] = ("tp",),
        pp: int = 1,
        num_layers: int | None = None,
        ep: int = 1,
        num_experts: int = 0,
    ) -> "ParallelDims":
        """The layout for a model with ``num_heads`` query heads (and ``num_layers`` layers).

        ``tp=None`` means one rank per stage, or under torchrun (``torchrun_world_size`` given)
        as many as torchrun started over ``pp`` x ``dp``; an explicit layout must then equal that
        world size. ``supported`` names the dimensions the command can run; any other above 1 is
        refused. With ``ep`` (a model of ``num_experts`` experts), ``tp=None`` means attention
        split over the stage's ranks under torchrun, else replicated (tp=1).
        """
        if tp is None:
            world = torchrun_world_size or 1
            other = dp * pp if all(isinstance(v, int) and v >= 1 for v in (dp, pp)) else 1
            tp = world // other if world % other == 0 else world
            if torchrun_world_size is None and isinstance(ep, int) and ep > 1:
                tp = 1
        dims = cls(tp=tp, pp=pp, dp=dp, ep=ep)
        if dims.ep > 1:
            if not num_experts:
                raise TensorparError(f"--ep {dims.ep}: the model has no experts (expert parallelism is for "
                                     "mixture-of-experts models)")
            if dims.ep > num_experts:
                raise TensorparError(f"--ep {dims.ep} is more expert sets than the model's {num_experts} experts")
            if dims.tp > 1 and dims.tp % dims.ep:
                raise TensorparError(f"--tp {dims.tp} must be 1 (attention replicated) or a multiple of --ep "
                                     f"{dims.ep} (each expert split over tp / ep ranks)")
        for name in ("pp", "dp", "ep"):
            if getattr(dims, name) > 1 and name not in supported:
                raise TensorparError(f"--{name} {getattr(dims, name)} is not supported by this command")
        try:
            check_degree(dims.tp, num_heads)
        except ValueError as e:
            raise TensorparError(str(e)) from None
        if num_layers is not None and dims.pp > num_layers:
            raise TensorparError(f"--pp {dims.pp} is more pipeline stages than the model's {num_layers} layers")
        if torchrun_world_size is not None and dims.world_size != torchrun_world_size:
            what = (f"--tp {dims.tp}" + (f" x --pp {dims.pp}" if dims.pp > 1 else "")
                    + (f" x --dp {dims.dp}" if dims.dp > 1 else ""))
            raise TensorparError(f"{what} does not match torchrun's world size {torchrun_world_size}")
        return dims
