"""The model-wide quantization pass: which matrices of a loaded, sharded model are packed, and the
swap of a float weight for its packing (``layers.quant`` holds the packed formats and kernels).

Each rank packs its own shards, so a group never straddles a shard boundary."""

from __future__ import annotations

from torch import nn

from tensorpar.layers.embedding import ParallelLMHead
from tensorpar.layers.linear import ColumnParallelLinear, RowParallelLinear
from tensorpar.layers.quant import DEFAULT_GROUP, QuantizedWeight, quantize_weight


def packable_modules(model: nn.Module):
    """(module, its float weight) for every column-, row-parallel linear and LM head of ``model``
    that holds a float weight on the CPU: the matrices a quantization replaces."""
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
            weight = module.weight
            if not isinstance(weight, QuantizedWeight) and weight.device.type == "cpu":
                yield module, weight


def set_packed(module: nn.Module, packed: QuantizedWeight) -> None:
    """Replace ``module``'s float weight by ``packed`` (a tied head's shared parameter stays with
    the embedding)."""
    if "weight" in module._parameters:
        del module._parameters["weight"]
    module.weight = packed


def quantize_model(model: nn.Module, scheme: str, group: int = DEFAULT_GROUP) -> dict:
    """Replace the weight of every column-, row-parallel linear and LM head of ``model`` (this
    rank's shards) by its ``scheme`` packing, in place; the embedding stays float (a tied head
    gets a packed copy of its rows). Returns {scheme used: matrices}."""
    used: dict[str, int] = {}
    if scheme == "none":
        return used
    for module, weight in list(packable_modules(model)):
        packed = quantize_weight(weight, scheme, group)
        set_packed(module, packed)
        used[packed.scheme] = used.get(packed.scheme, 0) + 1
    return used
