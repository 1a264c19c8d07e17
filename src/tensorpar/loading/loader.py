"""Build a sharded model on each rank and stream its slices in from a checkpoint.

The model is built on the ``meta`` device, rewritten by its plan, materialized (each rank
allocates only its shards), then every local parameter is filled from exactly the checkpoint
slices it owns. No rank ever holds a full weight matrix of another rank.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from tensorpar.dist.groups import ParallelContext
from tensorpar.errors import CheckpointError
from tensorpar.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, use_streaming_layout
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


def load_weights(model: nn.Module, source: CheckpointSource, progress: bool = False) -> None:
    """Fill every local parameter of a planned, materialized model from ``source``."""
    expected = expected_shapes(model.config)
    unloaded = {id(p): n for n, p in model.named_parameters()}
    modules = [(n, m) for n, m in model.named_modules() if hasattr(m, "load_shard") or list(m.parameters(recurse=False))]
    for name, module in tqdm(modules, desc="loading weights", unit="module", disable=not progress, leave=False):
        if hasattr(module, "load_shard"):
            parent = name.rpartition(".")[0]
            prefix = f"{parent}." if parent else ""

            def read(part, param, rows=None, cols=None, _prefix=prefix):
                full = f"{_prefix}{part}.{param}"
                return source.read(full, rows, cols, expect=expected.get(full))

            module.load_shard(read)
        else:
            for pname, p in module.named_parameters(recurse=False):
                full = f"{name}.{pname}"
                p.data.copy_(source.read(full, expect=expected.get(full)))
        for p in module.parameters(recurse=False):
            unloaded.pop(id(p), None)
    if unloaded:
        raise CheckpointError(f"{source.path}: parameters left unloaded: {sorted(unloaded.values())[:5]}")


def build_model(
    source: CheckpointSource, ctx: ParallelContext, dtype: torch.dtype = torch.float32, progress: bool = False
) -> LlamaForCausalLM:
    """The model of ``source``, sharded for ``ctx``'s rank, with its weights loaded."""
    cfg = source.config
    check_degree(ctx.world_size, cfg.num_heads)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    apply_plan(model, plan_for(cfg.architecture), ctx)
    model.to(dtype).to_empty(device=ctx.device)
    if ctx.device.type == "cpu":  # lay out the still-empty weights; loading then writes in place
        for module in model.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
                use_streaming_layout(module.weight)
    with torch.no_grad():
        load_weights(model, source, progress=progress)
    return model.eval().requires_grad_(False)
