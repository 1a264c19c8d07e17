"""Bit-for-bit checks of what the ranks of a tensor-parallel group hold replicated (``tensorpar
check`` at TP > 1, ``LLM.replica_mismatch``): a rank that misses an all-reduce shows first in the
residual stream of the layer where it did.

``replica_digests`` runs on every rank; ``first_mismatch`` compares the ranks' digests on the leader.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import nn

from tensorpar.distributed.collectives import all_gather_object
from tensorpar.distributed.groups import ParallelContext
from tensorpar.models.blocks import RMSNorm


def digest(t: torch.Tensor) -> str:
    """A 128-bit hash of a tensor's bytes."""
    return hashlib.blake2b(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes(),
                           digest_size=16).hexdigest()


def replica_digests(model: nn.Module, score: Callable[[], object], ctx: ParallelContext) -> list[dict]:
    """Collective: run ``score`` (one scoring step of a prompt) once, digesting every value this
    rank holds replicated: each layer's norm weights, the keys and values of each KV head it holds
    (a KV head held by several ranks is replicated; the digest covers its weights, bias and
    input), and the residual stream the layer leaves (after its all-reduces). Returns every
    rank's digests (name -> hash, in layer order), in rank order."""
    norms = {name: digest(p) for name, m in model.named_modules() if isinstance(m, (RMSNorm, nn.LayerNorm))
             for pname, p in m.named_parameters(recurse=False) for name in [f"{name}.{pname}"]}
    heads: dict[int, dict] = {i: {} for i in model.layer_ids}
    outputs: dict[int, str] = {}

    def kv_digests(i, attn, qkv):  # qkv: [B, S, (slots + 2 kv) d]
        d, kv = attn.head_dim, attn.num_kv_heads
        k0 = attn.num_heads * d
        for j, head in enumerate(attn.kv_heads):
            for what, start in (("key", k0), ("value", k0 + kv * d)):
                heads[i][f"model.layers.{i}.self_attn {what} of KV head {head}"] = \
                    digest(qkv[..., start + j * d: start + (j + 1) * d])

    hooks = []
    for i in model.layer_ids:
        layer = model.model.layers[i]
        hooks.append(layer.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, digest(out))))
        attn = getattr(layer, "self_attn", None)
        if hasattr(attn, "kv_heads"):
            hooks.append(attn.qkv_proj.register_forward_hook(
                lambda m, args, out, i=i, attn=attn: kv_digests(i, attn, out)))
    try:
        score()
    finally:
        for h in hooks:
            h.remove()
    ordered = {}
    for i in model.layer_ids:
        ordered.update({k: v for k, v in norms.items() if k.startswith(f"model.layers.{i}.")})
        ordered.update(heads[i])
        ordered[f"model.layers.{i} output (the residual stream)"] = outputs[i]
    ordered.update({k: v for k, v in norms.items() if not k.startswith("model.layers.")})
    return all_gather_object(ordered, ctx)


def first_mismatch(digests: list[dict], dims) -> str | None:
    """Within each tensor-parallel group (``dims``: the ``ParallelDims``), the first layer and
    tensor whose copies differ, and the ranks, as one line; None where every copy agrees."""
    stages: dict[int, list[int]] = {}
    for rank in range(len(digests)):
        stages.setdefault(dims.coordinates(rank)[0], []).append(rank)
    for stage, ranks in stages.items():
        names = list(dict.fromkeys(n for r in ranks for n in digests[r]))  # in layer order, every rank's own
        names.sort(key=lambda n: (_layer_of(n), min(list(digests[r]).index(n) for r in ranks if n in digests[r])))
        for name in names:
            holders = [r for r in ranks if name in digests[r]]
            for rank in holders[1:]:
                if digests[rank][name] != digests[holders[0]][name]:
                    return (f"{name} differs between rank {holders[0]} and rank {rank}"
                            + (f" (stage {stage})" if dims.pp > 1 else ""))
    return None


def _layer_of(name: str) -> float:
    """The layer a digest's name belongs to ("model.layers.3.input_layernorm.weight": 3); after
    every layer for the rest."""
    if not name.startswith("model.layers."):
        return float("inf")
    return int(name.split(".")[2].split()[0])
