"""Build a sharded model on each rank and stream its slices in from a checkpoint.

The model (its architecture module's ``MODEL``) is built on the ``meta`` device, rewritten by
its plan (``PLAN``), materialized (each rank allocates only its shards), then every local
parameter is filled from exactly the checkpoint slices it owns. No rank ever holds a full weight
matrix of another rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from tensorpar.distributed.groups import ParallelContext
from tensorpar.errors import CheckpointError
from tensorpar.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, use_streaming_layout
from tensorpar.layers.pieces import ParamPieces, fill_from_pieces, model_pieces
from tensorpar.loading.huge_pages import move_to_huge_pages
from tensorpar.loading.quantize import packable_modules, quantize_model, set_packed
from tensorpar.loading.sources import CheckpointSource
from tensorpar.models.registry import checkpoint_shapes, model_module
from tensorpar.plans import apply_plan, tie_embeddings
from tensorpar.process import release_freed_memory

if TYPE_CHECKING:
    from tensorpar.layers.quant import QuantizedWeight


def fill_parameter(pp: ParamPieces, dst: torch.Tensor, source: CheckpointSource, expected: dict) -> None:
    """Write the checkpoint slices that ``pp``'s pieces name into ``dst`` (shaped like ``pp.param``)."""

    def read(part, param, rows=None, cols=None):
        full = f"{pp.prefix}{part}.{param}"
        return source.read(full, rows, cols, expect=expected.get(full))

    fill_from_pieces(dst, pp.pieces, read, chunk_align=source.config.head_dim)


def read_packed(pp: ParamPieces, source: CheckpointSource, expected: dict) -> "QuantizedWeight | None":
    """``pp``'s weight [out, in] packed from the checkpoint's own quantization codes
    (``CheckpointSource.read_codes``), or None where any of its pieces is not stored so.

    Pieces stacked by rows (a fused projection's parts, a vocabulary span) are joined, parts of
    different group sizes as ``StackedRows``; a rank's columns (a row-parallel shard) that start
    or end inside a group keep the whole groups, the activations padded with zeros to match.
    """
    from tensorpar.layers.quant import BlockCodes, StackedRows, pack_codes

    axis = pp.pieces[0].axis
    read: list[tuple[BlockCodes | None, int, int]] = []  # (codes or None for zeros, lead, entries along axis)
    for pc in pp.pieces:
        n = len(pc.local) if pc.local is not None else 0
        if pc.part is None:
            read.append((None, 0, n))
            continue
        name = pp.full_name(pc)
        got = source.read_codes(name, pc.span if axis == 0 else None, pc.span if axis == 1 else None,
                                expect=expected.get(name))
        if got is None:
            return None
        read.append((got[0], got[1], n))
    real = [c for c, _, _ in read if c is not None]
    if axis == 1:
        if len(read) == 1:
            codes, lead, n = read[0]
            return pack_codes(codes, (lead, codes.shape[1] - lead - n))
        group = real[0].group
        if any(c is not None and (lead or c.shape[1] != n) for c, lead, n in read) or any(n % group for _, _, n in read):
            return None  # (shards of several segments that cut groups: read as float)
        return pack_codes(BlockCodes.cat([c if c is not None else BlockCodes.zeros(real[0].shape[0], n, group)
                                          for c, _, n in read], dim=1))
    width = real[0].shape[1]
    runs: list[list[BlockCodes]] = []
    for i, (c, _, n) in enumerate(read):
        if c is None:  # zero rows join the run before them (or the first part's)
            group = runs[-1][-1].group if runs else real[0].group
            c = BlockCodes.zeros(n, width, group)
        if runs and runs[-1][-1].group == c.group:
            runs[-1].append(c)
        else:
            runs.append([c])
    packed = [pack_codes(BlockCodes.cat(run, dim=0)) for run in runs]
    return packed[0] if len(packed) == 1 else StackedRows(packed)


def pack_file_blocks(model: nn.Module, source: CheckpointSource, progress: bool = False) -> dict[str, int]:
    """``--quantization gguf``: every linear weight and LM head of ``model`` (this rank's shards)
    packed from the checkpoint's own blocks, before any float weight is written (the floats they
    replace were never touched, so never resident). The embedding keeps its rows as codes too
    (``CodesTable``). A matrix whose file type has no codes stays float and is loaded as usual. Returns {kernel: matrices}, ``float`` for those left."""
    from tensorpar.layers.embedding import VocabParallelEmbedding
    from tensorpar.layers.quant import CodesTable

    expected = checkpoint_shapes(model.config)
    owners = {id(pp.param): pp for pp in model_pieces(model)}  # (a tied head: the embedding's pieces)
    used: dict[str, int] = {}
    modules = list(packable_modules(model))
    for module, weight in tqdm(modules, desc="packing weights", unit="matrix", disable=not progress, leave=False):
        pp = owners.get(id(weight))
        packed = read_packed(pp, source, expected) if pp is not None else None
        kind = "float" if packed is None else type(packed).__name__
        if packed is not None:
            set_packed(module, packed)
        used[kind] = used.get(kind, 0) + 1
    floats = {id(w) for _, w in packable_modules(model)}
    for module in model.modules():  # embeddings, unless a head left float still shares the table
        if isinstance(module, VocabParallelEmbedding) and id(module.weight) not in floats:
            pp = owners[id(module.weight)]
            (pc,) = pp.pieces
            name = pp.full_name(pc)
            got = source.read_codes(name, pc.span, None, expect=expected.get(name))
            if got is not None:
                set_packed(module, CodesTable(got[0]))
                used["CodesTable"] = used.get("CodesTable", 0) + 1
    return used


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
    moe_dispatch: str = "auto",
    quantization: str = "none",
    quant_group: int = 32,
) -> nn.Module:
    """The model of ``source``, sharded for ``ctx``'s rank (of its tensor-parallel group), with
    its weights loaded; ``layers``: only this pipeline stage's (``partition.stage_layers``).

    For inference (default): frozen, in eval mode, wide CPU weights in their streaming layout.
    ``trainable``: parameters require gradients, train mode, the plain layout. The degree is the
    caller's to have checked (``tensorpar.distributed.dims.ParallelDims``).

    A mixture of experts places its experts over ``ctx``'s ranks in ``ep`` sets and sends them
    tokens by ``moe_dispatch`` (``layers.experts.ExpertParallelMoE``); the rest of the model is
    split over them too, or (``attention_tp=1`` on several ranks) replicated on each.
    ``quantization`` (inference): the loaded shards packed as ``loading.quantize`` says; ``gguf``:
    packed from the file's own blocks instead of loaded as float (``pack_file_blocks``).
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
    apply_plan(model, arch.PLAN, dense_ctx, strict=not (stage or moe))
    if moe:
        apply_plan(model, arch.EXPERT_PLAN, ctx, ep=ep, moe_dispatch=moe_dispatch)
    model.to(dtype).to_empty(device=ctx.device)
    if cfg.tie_word_embeddings:
        if not stage:
            tie_embeddings(model)
        elif isinstance(model.lm_head, ParallelLMHead):  # a last stage's tied head reads the embedding's rows
            model.lm_head.part = "model.embed_tokens"
    with torch.no_grad():
        if quantization == "gguf":
            pack_file_blocks(model, source, progress=progress)
            release_freed_memory()  # (the decoding's temporaries)
        if ctx.device.type == "cpu" and not trainable:  # lay out the still-empty weights; loading then writes in place
            for module in model.modules():
                if isinstance(module, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
                    if isinstance(module.weight, torch.Tensor):
                        use_streaming_layout(module.weight)
        load_weights(model, source, progress=progress)
    if trainable:
        return model.train().requires_grad_(True)
    if quantization in ("int8", "int4"):
        quantize_model(model, quantization, quant_group)
    if ctx.device.type == "cpu":
        move_to_huge_pages(model)
    return model.eval().requires_grad_(False)
