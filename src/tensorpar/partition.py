"""Pure shard arithmetic: who owns which rows, heads, KV groups and vocabulary entries.

Every other module asks this one; nothing here touches torch or a process group, so it can be
tested exhaustively in milliseconds. All functions are total: any degree from 1 to the number of
query heads works, including uneven splits (9 heads on 2 ranks) and KV-head replication
(3 KV heads on 4 ranks).

Conventions
-----------
A *span* is a Python ``range`` of global indices. An *even split* of ``n`` items over ``p`` parts
gives the first ``n % p`` parts ``ceil(n / p)`` items and the rest ``floor(n / p)``, so no part
holds more than one item more than another.

Attention heads. With ``H`` query heads and ``K`` KV heads, query head ``h`` reads KV head
``h // (H / K)`` (grouped-query attention). A rank holding query heads ``[q0, q1)`` must hold every
KV head its query heads read, ``[(q0 // g), ((q1 - 1) // g) + 1)`` with ``g = H / K``; KV heads are
therefore replicated when ``p > K`` or when a split straddles a KV group. Locally the query heads
are laid out in *slots*: ``kv_local * G`` of them, ``G`` per local KV head, where ``G`` is the
largest number of the rank's query heads that share one KV head. Slots without a query head are
padding (zero weights), which makes the local attention a regular GQA with group size ``G`` and
needs no index gathers on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil


def even_split(n: int, parts: int, index: int) -> range:
    """The span of ``range(n)`` that part ``index`` of ``parts`` owns under an even split."""
    if parts < 1:
        raise ValueError(f"number of parts must be >= 1, got {parts}")
    if not 0 <= index < parts:
        raise ValueError(f"part index {index} outside [0, {parts})")
    if n < 0:
        raise ValueError(f"cannot split a negative size {n}")
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def even_splits(n: int, parts: int) -> list[range]:
    """All spans of an even split of ``range(n)`` into ``parts``, in order."""
    return [even_split(n, parts, i) for i in range(parts)]


def grid_split(n: int, chunk: int, parts: int, index: int) -> range:
    """The span part ``index`` of ``parts`` owns when ``range(n)`` is cut into chunks of ``chunk``
    (the last one shorter) and the chunks, whole, are split evenly: a split whose boundaries lie on
    a grid that does not depend on ``parts`` (deterministic mode's reduction grid)."""
    whole = even_split(-(-n // chunk), parts, index)
    return range(min(whole.start * chunk, n), min(whole.stop * chunk, n))


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The contiguous layers pipeline stage ``stage`` of ``pp`` runs: an even split, the first
    stages taking one more when ``pp`` does not divide ``num_layers`` (the planner splits so too).
    The first stage also holds the embedding, the last the final norm and the head."""
    if pp > num_layers:
        raise ValueError(f"{pp} pipeline stages for {num_layers} layers: at most one stage per layer")
    return even_split(num_layers, pp, stage)


def padded_shard_size(n: int, parts: int) -> int:
    """``ceil(n / parts)``: the size every shard is padded to when shards must be equal (all-gather)."""
    return ceil(n / parts)


def valid_degrees(num_heads: int) -> range:
    """Tensor-parallel degrees that tensorpar accepts for a model with ``num_heads`` query heads."""
    return range(1, num_heads + 1)


def check_degree(tp: int, num_heads: int) -> None:
    """Raise ``ValueError`` naming the valid range unless ``1 <= tp <= num_heads``."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp not in valid_degrees(num_heads):
        raise ValueError(
            f"tensor-parallel degree {tp!r} is not valid for a model with {num_heads} query heads: "
            f"choose a degree from 1 to {num_heads} (any value in that range works, "
            f"it need not divide the head count)"
        )


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank holds.

    q_heads:   global query heads held, a contiguous span.
    kv_heads:  global KV heads held: exactly those that ``q_heads`` read.
    group:     ``G``, query slots per local KV head (the rank's largest local group).
    q_slots:   for each of the ``len(kv_heads) * G`` local query slots, the global query head it
               holds, or ``None`` for a padding slot.
    """

    q_heads: range
    kv_heads: range
    group: int
    q_slots: tuple[int | None, ...]

    @property
    def num_slots(self) -> int:
        return len(self.q_slots)

    @property
    def num_kv(self) -> int:
        return len(self.kv_heads)

    @property
    def padded(self) -> bool:
        return None in self.q_slots


def head_shard(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> HeadShard:
    """The query and KV heads that ``rank`` of ``tp`` holds (see the module docstring)."""
    check_degree(tp, num_heads)
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"{num_heads} query heads cannot share {num_kv_heads} KV heads: "
            f"the query head count must be a multiple of the KV head count"
        )
    g = num_heads // num_kv_heads
    q = even_split(num_heads, tp, rank)
    kv = range(q.start // g, (q.stop - 1) // g + 1)
    members = [[h for h in q if h // g == k] for k in kv]
    group = max(len(m) for m in members)
    slots: list[int | None] = []
    for m in members:
        slots.extend(m + [None] * (group - len(m)))
    return HeadShard(q_heads=q, kv_heads=kv, group=group, q_slots=tuple(slots))


def head_rows(heads: range, head_dim: int) -> range:
    """Rows of a ``[heads * head_dim, ...]`` projection weight that hold ``heads``."""
    return range(heads.start * head_dim, heads.stop * head_dim)


def slot_segments(shard: HeadShard, head_dim: int) -> list[range | None]:
    """The query rows (or ``None`` for padding) for each local query slot, adjacent heads merged.

    Each entry covers ``head_dim`` rows per head; a run of consecutive real heads becomes one span,
    a run of padding slots one ``None`` per slot.
    """
    out: list[range | None] = []
    for h in shard.q_slots:
        if h is None:
            out.append(None)
        elif out and out[-1] is not None and out[-1].stop == h * head_dim:
            out[-1] = range(out[-1].start, (h + 1) * head_dim)
        else:
            out.append(range(h * head_dim, (h + 1) * head_dim))
    return out


def vocab_shard(vocab_size: int, tp: int, rank: int) -> range:
    """The vocabulary entries (embedding / LM-head rows) that ``rank`` holds."""
    return even_split(vocab_size, tp, rank)


A2A_MIN_TOKENS = 64  # below this a step is latency-bound: one all-reduce beats three collectives


def moe_dispatch(tokens: int, top_k: int, ranks: int, whole_experts: bool = True) -> str:
    """How ``auto`` sends a step's ``tokens`` to the experts on ``ranks`` ranks (``layers.experts``).

    Per rank, the ``reduce`` dispatch moves 2 (n - 1) / n T h values (a ring all-reduce of the
    partial sums); ``all_to_all`` moves 2 (T / n) k (n - 1) / n h (each (token, choice) row there
    and back) plus (n - 1) / n T h (the all-gather of the slices), fewer exactly when n > 2 k. So:
    ``all_to_all`` when each expert is whole on one rank, n > 2 k and the step has at least
    ``A2A_MIN_TOKENS`` tokens; ``reduce`` otherwise.
    """
    if not whole_experts or ranks <= 2 * top_k or tokens < A2A_MIN_TOKENS:
        return "reduce"
    return "all_to_all"
