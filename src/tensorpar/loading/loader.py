"""Build a sharded model on each rank and stream its slices in from a checkpoint.

The model is built on the ``meta`` device, rewritten by its plan, materialized (each rank
allocates only its shards), then every local parameter is filled from exactly the checkpoint
slices it owns. No rank ever holds a full weight matrix of another rank.
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
from tensorpar.models.config import ModelConfig
from tensorpar.models.llama import LlamaForCausalLM
from tensorpar.partition import check_degree
from tensorpar.plans import apply_plan, plan_for


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> full shape, as the config implies (fused layers split by part)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0]
        parts = getattr(module, "fused_parts", None)
        if parts:
            for part, n in parts:
                shapes[f"{parent}.{part}.weight"] = (n, module.in_features)
                if module.bias is not None:
                    shapes[f"{parent}.{part}.bias"] = (n,)
            continue
        for pname, p in module.named_parameters(recurse=False):
            shapes[f"{name}.{pname}"] = tuple(p.shape)
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def fill_parameter(pp: ParamPieces, dst: torch.Tensor, source: CheckpointSource, expected: dict) -> None:
    """Write the checkpoint slices that ``pp``'s pieces name into ``dst`` (shaped like ``pp.param``)."""

    def read(part, param, rows=None, cols=None):
        full = f"{pp.prefix}{part}.{param}"
        return source.read(full, rows, cols, expect=expected.get(full))

    fill_from_pieces(dst, pp.pieces, read)


def load_weights(model: nn.Module, source: CheckpointSource, progress: bool = False) -> None:
    """Fill every local parameter of a planned, materialized model from ``source``, piece by piece."""
    expected = expected_shapes(model.config)
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
) -> LlamaForCausalLM:
    """The model of ``source``, sharded for ``ctx``'s rank, with its weights loaded.

    For inference (default): frozen, in eval mode, wide CPU weights in their streaming layout.
    ``trainable``: parameters require gradients, train mode, the plain layout.
    """
    cfg = source.config
    check_degree(ctx.world_size, cfg.num_heads)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    apply_plan(model, plan_for(cfg.architecture), ctx)
    model.to(dtype).to_empty(device=ctx.device)
    if ctx.device.type == "cpu" and not trainable:  # lay out the still-empty weights; loading then writes in place
        for module in model.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
                use_streaming_layout(module.weight)
    with torch.no_grad():
        load_weights(model, source, progress=progress)
    if trainable:
        return model.train().requires_grad_(True)
    return model.eval().requires_grad_(False)
