"""Build a sharded model on each rank and stream its slices in from a checkpoint.

The model (its architecture module's ``MODEL``) is built on the ``meta`` device, rewritten by
its plan (``PLAN``), materialized (each rank allocates only its shards), then every local
parameter is filled from exactly the checkpoint slices it owns. No rank ever holds a full weight
matrix of another rank.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from tensorpar.distributed.groups import ParallelContext
from tensorpar.errors import CheckpointError
from tensorpar.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, use_streaming_layout
from tensorpar.layers.pieces import ParamPieces, fill_from_pieces, model_pieces
from tensorpar.loading.sources import CheckpointSource
from tensorpar.models.registry import checkpoint_shapes, model_module
from tensorpar.plans import apply_plan, tie_embeddings


def fill_parameter(pp: ParamPieces, dst: torch.Tensor, source: CheckpointSource, expected: dict) -> None:
    """Write the checkpoint slices that ``pp``'s pieces name into ``dst`` (shaped like ``pp.param``)."""

    def read(part, param, rows=None, cols=None):
        full = f"{pp.prefix}{part}.{param}"
        return source.read(full, rows, cols, expect=expected.get(full))

    fill_from_pieces(dst, pp.pieces, read, chunk_align=source.config.head_dim)


def load_weights(model: nn.Module, source: CheckpointSource, progress: bool = False) -> None:
    """Fill every local parameter of a planned, materialized model from ``source``, piece by piece."""
    expected = checkpoint_shapes(model.config)
    params = model_pieces(model)
    unloaded = {n for n, _ in model.named_parameters()} - {pp.name for pp in params}
    if unloaded:
        raise CheckpointError(f"{source.path}: parameters with no checkpoint source: {sorted(unloaded)[:5]}")
    for pp in tqdm(params, desc="loading weights", unit="tensor", disable=not progress, leave=False):
        fill_parameter(pp, pp.param.data, source, expected)


def build_model(
    source: CheckpointSource,
    ctx: ParallelContext,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    trainable: bool = False,
    layers: range | None = None,
    ep: int = 1,
    attention_tp: int | None = None,
    quantization: str = "none",
    quant_group: int = 32,
) -> nn.Module:
    """The model of ``source``, sharded for ``ctx``'s rank (of its tensor-parallel group), with
    its weights loaded; ``layers``: only this pipeline stage's (``partition.stage_layers``).

    For inference (default): frozen, in eval mode, wide CPU weights in their streaming layout.
    ``trainable``: parameters require gradients, train mode, the plain layout. The degree is the
    caller's to have checked (``tensorpar.distributed.dims.ParallelDims``).

    A mixture of experts places its experts over ``ctx``'s ranks in ``ep`` sets; the rest of the
    model is split over them too, or (``attention_tp=1`` on several ranks) replicated on each.
    ``quantization`` (inference): the loaded shards packed as ``layers.quant`` says.
    """
    cfg = source.config
    arch = model_module(cfg)
    stage = layers is not None and len(layers) < cfg.num_layers
    with torch.device("meta"):
        model = arch.MODEL(cfg, layers=layers) if stage else arch.MODEL(cfg)
    dense_ctx = ctx
    if attention_tp == 1 and ctx.world_size > 1:
        from tensorpar.distributed.groups import single_process_context

        dense_ctx = single_process_context(ctx.device)
    moe = cfg.num_experts > 0  # (its dense-MLP patterns match only the layers that have one, if any)
    apply_plan(model, arch.PLAN, dense_ctx, stage=stage or moe)
    if moe:
        import dataclasses

        apply_plan(model, arch.EXPERT_PLAN, dataclasses.replace(ctx, ep=ep), stage=True)
    model.to(dtype).to_empty(device=ctx.device)
    if cfg.tie_word_embeddings:
        if not stage:
            tie_embeddings(model)
        elif isinstance(model.lm_head, ParallelLMHead):  # a last stage's tied head reads the embedding's rows
            model.lm_head.part = "model.embed_tokens"
    if ctx.device.type == "cpu" and not trainable:  # lay out the still-empty weights; loading then writes in place
        for module in model.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
                use_streaming_layout(module.weight)
    with torch.no_grad():
        load_weights(model, source, progress=progress)
    if trainable:
        return model.train().requires_grad_(True)
    if quantization != "none":
        from tensorpar.layers.quant import quantize_model

        quantize_model(model, quantization, quant_group)
    return model.eval().requires_grad_(False)
