"""The parallel layout of one run, resolved and checked once, before any rank starts.

``ParallelDims`` is built in the process that launches (from the model's config and the user's
flags, or from ``torchrun``'s world size), carried to every rank inside the run's spec, and
trusted there. The world is ``tp * pp * dp`` ranks; ``ep`` (experts) splits inside it.
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
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def replica_size(self) -> int:
        """Ranks of one replica: ``tp * pp`` (each data-parallel replica is its own process group)."""
        return self.tp * self.pp

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
            value = getattr(self, name)
            span *= value
            if value > 1 or name == "tp":
                where = "within each node" if per_node % span == 0 else f"across {nodes} nodes"
                parts.append(f"{name}={value} {where}")
        return ", ".join(parts)

    def place(self, rank: int) -> str:
        """Where ``rank`` (of one replica) sits, for messages: ``stage 1 of 2, tp rank 0 of 2`` ("" without stages)."""
        if self.pp == 1:
            return ""
        stage, t = self.coordinates(rank)
        return f"stage {stage} of {self.pp}, tp rank {t} of {self.tp}"

    def coordinates(self, rank: int) -> tuple[int, int]:
        """(pipeline stage, tensor-parallel index) of ``rank``: a stage's ranks are adjacent."""
        return divmod(rank, self.tp)

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
    ) -> "ParallelDims":
        """The layout for a model with ``num_heads`` query heads (and ``num_layers`` layers).

        ``tp=None`` means one rank per stage, or under torchrun (``torchrun_world_size`` given)
        as many as torchrun started over ``pp`` x ``dp``; an explicit layout must then equal that
        world size. ``supported`` names the dimensions the command can run; any other above 1 is
        refused.
        """
        if tp is None:
            world = torchrun_world_size or 1
            other = dp * pp if all(isinstance(v, int) and v >= 1 for v in (dp, pp)) else 1
            tp = world // other if world % other == 0 else world
        dims = cls(tp=tp, pp=pp, dp=dp)
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
