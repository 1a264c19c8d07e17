"""``apply_plan``: swap a plain model's modules for sharded ones, as a plan says.

Styles (the whole vocabulary of plans):

- ``colwise``         column-parallel linear; each fused part (``fused_parts``) split evenly.
- ``rowwise``         row-parallel linear; input features split evenly.
- ``colwise_heads``   column-parallel fused QKV (its ``fused_parts`` are query, key, value), split
                      by attention heads (``partition.head_shard``); also sets the parent
                      attention's local ``num_heads`` / ``num_kv_heads`` and the global ``kv_heads`` it holds.
- ``rowwise_heads``   row-parallel output projection over the same head slots.
- ``vocab_embedding`` vocabulary-parallel embedding.
- ``vocab_head``      vocabulary-parallel LM head (``tie_embeddings`` shares the embedding's shard).
- ``experts``         an MoE layer (``models.blocks.MoE``) becomes an ``ExpertParallelMoE`` with
                      its experts over ``ep`` expert sets of the group (``apply_plan(ep=)``): set g
                      (ranks g*t .. g*t + t - 1, t = size / ep) holds experts ``even_split(E, ep, g)``
                      whole, each split by intermediate rows over its t ranks (expert TP); the
                      others become empty placeholders, so that names keep the checkpoint's expert
                      numbers. Tokens reach the experts by ``apply_plan(moe_dispatch=)``. A dense
                      MLP the pattern also matches (between MoE layers) is left as it is.

Modules that no pattern names are replicated. Apply a plan to a model on the ``meta`` device,
then materialize (each rank allocates only its shards), then tie.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from functools import partial

import torch
from torch import nn

from tensorpar.distributed.groups import ParallelContext, single_process_context
from tensorpar.layers import deterministic
from tensorpar.layers import (
    ColumnParallelLinear,
    ExpertParallelMoE,
    ParallelLMHead,
    RowParallelLinear,
    Segment,
    VocabParallelEmbedding,
)
from tensorpar.models.norms import RMSNorm
from tensorpar.partition import even_split, grid_split, head_rows, head_shard, slot_segments, vocab_shard


def _inner_split(n: int, cfg, parts: int, index: int) -> range:
    """Part ``index`` of ``parts`` of an inner dimension (a column-parallel output that a row-parallel
    product takes in): an even split, or in deterministic mode whole chunks of its reduction grid."""
    if deterministic.enabled():
        return grid_split(n, deterministic.grid_chunk(n, cfg.num_heads), parts, index)
    return even_split(n, parts, index)


def _chunks(key: tuple, span: range, chunk: int, first_row: int) -> list[tuple[tuple, range]]:
    """Deterministic mode's grid over a column-parallel output (its backward sums dX over it):
    ((key, global chunk), local rows) of each whole chunk of ``span``, whose rows start at ``first_row``."""
    return [((*key, c), range(first_row + c * chunk - span.start, first_row + min((c + 1) * chunk, span.stop) - span.start))
            for c in range(span.start // chunk, -(-span.stop // chunk))]


def _colwise(name, module, parent, cfg, ctx: ParallelContext):
    parts = getattr(module, "fused_parts", ((name.rsplit(".", 1)[-1], module.out_features),))
    segs = [Segment(p, _inner_split(n, cfg, ctx.world_size, ctx.rank)) for p, n in parts]
    layer = ColumnParallelLinear(module.in_features, segs, module.bias is not None, ctx)
    if deterministic.enabled():
        row, layer.out_grid = 0, []
        for i, ((_, n), seg) in enumerate(zip(parts, segs)):
            layer.out_grid += _chunks((i,), seg.span, deterministic.grid_chunk(n, cfg.num_heads), row)
            row += len(seg.span)
    return layer


def _rowwise(name, module, parent, cfg, ctx: ParallelContext):
    span = _inner_split(module.in_features, cfg, ctx.world_size, ctx.rank)
    layer = RowParallelLinear([Segment(name.rsplit(".", 1)[-1], span)], module.out_features, module.bias is not None, ctx)
    if deterministic.enabled():
        layer.grid = _grid_of(span, deterministic.grid_chunk(module.in_features, cfg.num_heads))
    return layer


def _grid_of(span: range, chunk: int) -> list[tuple[int, range]]:
    """(global chunk, local columns) of each chunk of ``span`` (whole chunks of ``chunk``, the last shorter)."""
    return [(g, range(max(g * chunk, span.start) - span.start, min((g + 1) * chunk, span.stop) - span.start))
            for g in range(span.start // chunk, -(-span.stop // chunk))]


def _head_segments(part: str, shard, head_dim: int) -> list[Segment]:
    """One segment per run of the shard's query slots: rows of ``part``, or padding."""
    return [Segment(part, s) if s is not None else Segment(None, range(head_dim)) for s in slot_segments(shard, head_dim)]


def _colwise_heads(name, module, parent, cfg, ctx: ParallelContext):
    (q, _), (k, _), (v, _) = module.fused_parts  # query, key and value parts, in that order
    shard = head_shard(cfg.num_heads, cfg.num_kv_heads, ctx.world_size, ctx.rank)
    kv = head_rows(shard.kv_heads, cfg.head_dim)
    segs = _head_segments(q, shard, cfg.head_dim) + [Segment(k, kv), Segment(v, kv)]
    parent.num_heads, parent.num_kv_heads, parent.kv_heads = shard.num_slots, shard.num_kv, shard.kv_heads
    layer = ColumnParallelLinear(module.in_features, segs, module.bias is not None, ctx)
    if deterministic.enabled():  # a chunk per query head, then per key head, then per value head
        d, slots = cfg.head_dim, len(shard.q_slots)
        parent.q_slots, parent.q_per_kv = shard.q_slots, cfg.num_heads // cfg.num_kv_heads
        layer.out_grid = [((0, h), range(i * d, (i + 1) * d)) for i, h in enumerate(shard.q_slots) if h is not None]
        for part, first in ((1, slots), (2, slots + len(kv) // d)):
            layer.out_grid += [((part, j), range((first + m) * d, (first + m + 1) * d))
                               for m, j in enumerate(shard.kv_heads)]
    return layer


def _rowwise_heads(name, module, parent, cfg, ctx: ParallelContext):
    shard = head_shard(cfg.num_heads, cfg.num_kv_heads, ctx.world_size, ctx.rank)
    segs = _head_segments(name.rsplit(".", 1)[-1], shard, cfg.head_dim)
    layer = RowParallelLinear(segs, module.out_features, module.bias is not None, ctx)
    if deterministic.enabled():  # the reduction grid: one chunk per head (padding slots hold none)
        d, local = cfg.head_dim, range(0, 0)
        layer.grid = []
        for seg in segs:
            local = range(local.stop, local.stop + len(seg.span))
            if seg.part is not None:
                layer.grid += [(h, range(local.start + (h - seg.span.start // d) * d,
                                         local.start + (h - seg.span.start // d + 1) * d))
                               for h in range(seg.span.start // d, seg.span.stop // d)]
    return layer


def _vocab_spans(cfg, ctx: ParallelContext) -> list[range]:
    """Every rank's vocabulary rows: an even split, or in deterministic mode whole chunks of the
    head's grid (``_chunks``)."""
    if deterministic.enabled():
        chunk = deterministic.grid_chunk(cfg.vocab_size, cfg.num_heads)
        return [grid_split(cfg.vocab_size, chunk, ctx.world_size, r) for r in range(ctx.world_size)]
    return [vocab_shard(cfg.vocab_size, ctx.world_size, r) for r in range(ctx.world_size)]


def _vocab_embedding(name, module, parent, cfg, ctx: ParallelContext):
    span = _vocab_spans(cfg, ctx)[ctx.rank]
    return VocabParallelEmbedding(span, module.embedding_dim, ctx, name.rsplit(".", 1)[-1])


def _vocab_head(name, module, parent, cfg, ctx: ParallelContext):
    spans = _vocab_spans(cfg, ctx)
    head = ParallelLMHead(spans[ctx.rank], [len(s) for s in spans], module.in_features, ctx, name.rsplit(".", 1)[-1])
    if deterministic.enabled():
        head.out_grid = _chunks((0,), spans[ctx.rank], deterministic.grid_chunk(cfg.vocab_size, cfg.num_heads), 0)
    return head


def _experts(name, module, parent, cfg, ctx: ParallelContext, ep: int = 1, dispatch: str = "auto"):
    if not hasattr(module, "experts"):  # a dense MLP between MoE layers
        return module
    n, experts = ctx.world_size, module.experts
    if n % ep:
        raise ValueError(f"ep={ep} must divide the {n} ranks the experts are placed over")
    width = n // ep  # ranks sharing each expert (expert tensor parallelism)
    group, j = divmod(ctx.rank, width)
    sets = [list(even_split(len(experts), ep, g)) for g in range(ep)]
    rows = _inner_split(cfg.moe_intermediate_size, cfg, ctx.world_size // ep, j)
    alone = single_process_context(ctx.device)  # an expert's slices: no reduction of their own
    for e in range(len(experts)):
        if e not in sets[group]:
            experts[e] = nn.Module()
            continue
        gate_up, down = experts[e].gate_up_proj, experts[e].down_proj
        experts[e].gate_up_proj = ColumnParallelLinear(
            gate_up.in_features, [Segment(p, rows) for p, _ in gate_up.fused_parts], gate_up.bias is not None, alone)
        experts[e].down_proj = RowParallelLinear([Segment("down_proj", rows)], down.out_features, down.bias is not None,
                                                 alone)
    moe = ExpertParallelMoE(module, sets, group, ctx, dispatch)
    if deterministic.enabled():  # the experts' intermediate rows: a reduction grid, as a row-parallel product's
        moe.chunk = deterministic.grid_chunk(cfg.moe_intermediate_size, cfg.num_heads)
        moe.grid, moe.experts_intermediate = _grid_of(rows, moe.chunk), cfg.moe_intermediate_size
    return moe


BUILDERS = {
    "colwise": _colwise,
    "rowwise": _rowwise,
    "colwise_heads": _colwise_heads,
    "rowwise_heads": _rowwise_heads,
    "vocab_embedding": _vocab_embedding,
    "vocab_head": _vocab_head,
    "experts": _experts,
}
STYLES = tuple(BUILDERS)


def apply_plan(model: nn.Module, plan: dict[str, str], ctx: ParallelContext, *, strict: bool = True,
               ep: int = 1, moe_dispatch: str = "auto") -> nn.Module:
    """Replace every module whose path matches a plan pattern by its sharded counterpart.

    ``*`` matches any characters, dots included. ``strict``: a pattern that matches nothing is an
    error; pass False where some may (a pipeline stage lacks the embedding or the head; a mixture
    of experts may have no dense MLP). ``ep`` and ``moe_dispatch``: the expert-parallel degree and
    the token dispatch of the ``experts`` style.
    """
    builders = {**BUILDERS, "experts": partial(_experts, ep=ep, dispatch=moe_dispatch)}
    modules = dict(model.named_modules())
    for pattern, style in plan.items():
        matched = [n for n in modules if n and fnmatchcase(n, pattern)]
        if not matched and strict:
            raise ValueError(f"plan pattern {pattern!r} matches no module of {type(model).__name__}")
        for name in matched:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = modules[name]
            with torch.device(next(old.parameters()).device):  # a meta model stays on meta
                if style not in builders:
                    raise ValueError(f"unknown plan style {style!r} for {name}; styles: {', '.join(STYLES)}")
                setattr(parent, leaf, builders[style](name, old, parent, model.config, ctx))
    return model


def tie_embeddings(model: nn.Module) -> nn.Module:
    """Make the vocabulary-parallel head use the vocabulary-parallel embedding's weight (call it
    after materializing: moving a model between devices does not keep two modules' parameter shared)."""
    (embedding,) = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding)]
    (head,) = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    head.tie(embedding)
    return model


def set_sequence_parallel(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch the sharded layers between the two data flows of a tensor-parallel region.

    Off: replicated activations enter and leave each region (identity / all-reduce). On: the
    activations between regions (norms, residuals, the embedding's output) are split along the
    sequence; regions are entered by an all-gather and left by a reduce-scatter (Korthikanti et
    al. 2022), which moves the same bytes but stores 1/p of those activations per rank.
    """
    ctx = next((m.ctx for m in model.modules() if isinstance(m, ColumnParallelLinear)), None)
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, ParallelLMHead)):
            module.sequence_parallel = enabled
        elif isinstance(module, RMSNorm):  # (deterministic mode: its weight's gradient gathers every token's share)
            module.sequence_ctx = ctx if enabled else None
    return model
