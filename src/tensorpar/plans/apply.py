"""``apply_plan``: swap a plain model's modules for sharded ones, as a plan says.

Styles (the whole vocabulary of plans):

- ``colwise``         column-parallel linear; each fused part (``fused_parts``) split evenly.
- ``rowwise``         row-parallel linear; input features split evenly.
- ``colwise_heads``   column-parallel fused QKV, split by attention heads (``partition.head_shard``);
                      also sets the parent attention's local ``num_heads`` / ``num_kv_heads``.
- ``rowwise_heads``   row-parallel output projection over the same head slots.
- ``vocab_embedding`` vocabulary-parallel embedding.
- ``vocab_head``      vocabulary-parallel LM head, sharing the embedding shard when tied.

Modules that no pattern names are replicated. Apply a plan to a model on the ``meta`` device,
then materialize: each rank allocates only its shards.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn

from tensorpar.distributed.groups import ParallelContext
from tensorpar.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    Segment,
    VocabParallelEmbedding,
)
from tensorpar.partition import even_split, even_splits, head_rows, head_shard, slot_segments, vocab_shard

STYLES = ("colwise", "rowwise", "colwise_heads", "rowwise_heads", "vocab_embedding", "vocab_head")


def _head_segments(cfg, ctx: ParallelContext, part: str) -> list[Segment]:
    shard = head_shard(cfg.num_heads, cfg.num_kv_heads, ctx.world_size, ctx.rank)
    d = cfg.head_dim
    return [Segment(part, s) if s is not None else Segment(None, range(d)) for s in slot_segments(shard, d)]


def _build(style: str, name: str, module: nn.Module, parent: nn.Module, model, ctx: ParallelContext):
    cfg = model.config
    leaf = name.rsplit(".", 1)[-1]
    tp, rank = ctx.world_size, ctx.rank
    bias = getattr(module, "bias", None) is not None
    if style == "colwise":
        parts = getattr(module, "fused_parts", ((leaf, module.out_features),))
        segs = [Segment(p, even_split(n, tp, rank)) for p, n in parts]
        return ColumnParallelLinear(module.in_features, segs, bias, ctx)
    if style == "rowwise":
        return RowParallelLinear([Segment(leaf, even_split(module.in_features, tp, rank))], module.out_features, bias, ctx)
    if style == "colwise_heads":
        shard = head_shard(cfg.num_heads, cfg.num_kv_heads, tp, rank)
        kv = head_rows(shard.kv_heads, cfg.head_dim)
        segs = _head_segments(cfg, ctx, "q_proj") + [Segment("k_proj", kv), Segment("v_proj", kv)]
        parent.num_heads, parent.num_kv_heads = shard.num_slots, shard.num_kv
        return ColumnParallelLinear(module.in_features, segs, bias, ctx)
    if style == "rowwise_heads":
        return RowParallelLinear(_head_segments(cfg, ctx, leaf), module.out_features, bias, ctx)
    if style == "vocab_embedding":
        return VocabParallelEmbedding(vocab_shard(cfg.vocab_size, tp, rank), module.embedding_dim, ctx, leaf)
    if style == "vocab_head":
        tied = None
        if cfg.tie_word_embeddings:
            tied = next(m for m in model.modules() if isinstance(m, VocabParallelEmbedding))
        sizes = [len(s) for s in even_splits(cfg.vocab_size, tp)]
        return ParallelLMHead(vocab_shard(cfg.vocab_size, tp, rank), sizes, module.in_features, ctx, leaf, tied)
    raise ValueError(f"unknown plan style {style!r} for {name}; styles: {', '.join(STYLES)}")


def apply_plan(model: nn.Module, plan: dict[str, str], ctx: ParallelContext) -> nn.Module:
    """Replace every module whose path matches a plan pattern by its sharded counterpart.

    Patterns are matched in plan order (``*`` matches one or more path components' characters),
    so the vocabulary embedding is built before a head that ties to it.
    """
    modules = dict(model.named_modules())
    for pattern, style in plan.items():
        matched = [n for n in modules if n and fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"plan pattern {pattern!r} matches no module of {type(model).__name__}")
        for name in matched:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = modules[name]
            with torch.device(next(old.parameters()).device):  # a meta model stays on meta
                setattr(parent, leaf, _build(style, name, old, parent, model, ctx))
    return model


def set_sequence_parallel(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch the sharded layers between the two data flows of a tensor-parallel region.

    Off: replicated activations enter and leave each region (identity / all-reduce). On: the
    activations between regions (norms, residuals, the embedding's output) are split along the
    sequence; regions are entered by an all-gather and left by a reduce-scatter (Korthikanti et
    al. 2022), which moves the same bytes but stores 1/p of those activations per rank.
    """
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, ParallelLMHead)):
            module.sequence_parallel = enabled
    return model
