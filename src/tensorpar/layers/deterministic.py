"""Deterministic mode: every value computed in an order that the model alone fixes, so that logits
are bitwise equal at every tensor-parallel degree (``--deterministic``, ``LLM(deterministic=True)``).

Floating-point addition is not associative, so a sum is only reproducible if its terms are added
in the same order. What a degree changes, and what this mode fixes:

- **Row-parallel products** (attention's output projection, the MLP's down projection) sum over
  their input dimension K, which the degree splits. Here K is cut into a *reduction grid* of chunks
  that does not depend on the degree: one chunk per attention head, and for any other row-parallel
  product chunks of ``grid_chunk(K, H)`` columns (H query heads, the highest degree; the degree then
  splits whole chunks, ``partition.grid_split``). Each rank computes the partial product of each
  of its chunks on its own, the group gathers them all, and every rank sums them in chunk order:

      y = (...((P_0 + P_1) + P_2) + ...) + P_{n-1},   P_c = x[:, chunk c] W[:, chunk c]^T

  which is the same sum, term for term, at TP=1 and at TP=p.
- **Every product** (the chunks above, and the column-parallel ones: QKV, gate/up, the head) runs on
  ``dense_linear``, whose value y[t, n] is a dot product accumulated in one fixed order (two
  chains of vector lanes along K, 16 with AVX-512 and 8 with AVX2, then a fixed horizontal sum): independent of the number of rows,
  the number of columns a rank holds, and the threads.
- **Attention** runs whole on one rank per head, but a batched matmul's or a softmax's order may
  depend on how many heads, rows or keys it is given: each head runs on the same kernel, its keys
  padded to a fixed grid (``attention``), in a prompt and at decode alike.
- **A mixture of experts** (``layers.experts``): the router on ``dense_linear``; each expert's down
  projection over a grid of its intermediate rows, the group summing disjoint partials (each
  added to zeros only: exact); a token's choices added in order.
- **Element-wise** functions with an ``exp`` (the logsumexp, the MLP's activation) run on scalar
  kernels: a vectorized loop treats its last elements apart, so a value could change with the
  length of the row it sits in.
- Everything else is already degree-invariant: norms and the residual stream are replicated, the
  vocabulary-parallel embedding sums one value with zeros, the head's logits are gathered.

The price: a row-parallel product gathers its chunks' partials (n chunks of [T, out] instead of one
all-reduce), and all products take the streaming kernel even where a GEMM would be faster.

The mode is per process (each rank sets it before building its model): ``enable``. Training's
backward passes, in the same orders: ``layers.deterministic_grads``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tensorpar.distributed.collectives import all_gather_dim, all_gather_object
from tensorpar.layers import fused

_state = {"on": False}


def enable(on: bool = True) -> None:
    """Turn the mode on (or off) in this process, before its model is built."""
    if on and not fused.available():
        from tensorpar.errors import TensorparError

        raise TensorparError("--deterministic needs tensorpar's C++ kernels, which could not be built here")
    _state["on"] = on


def enabled() -> bool:
    return _state["on"]


def grid_chunk(k: int, num_heads: int) -> int:
    """The reduction grid's chunk for a row-parallel product over ``k`` inputs that is not split by
    heads: a multiple of 16 (the kernel's lanes) small enough for ``num_heads`` ranks (the highest
    degree) to get a chunk each."""
    return max(16, (k // num_heads) // 16 * 16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b on ``dense_linear``, whatever the number of rows."""
    return fused.dense_linear(x, weight, bias)


KEY_GRID = 32  # a sum over a row on the kernel is padded with zeros to a multiple of this: its two chains of 16 lanes


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, causal: bool,
              scale: float | None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v on ``grid_attention``: q [B, h, S, d], keys and values
    [B, h, L, d] (one per query head) -> [B, h, S, d]. Its sums add their terms in an order that
    no shape changes (key after key), so a query's output is the same computed in a whole prompt,
    in a chunk, or alone at decode, beside any other sequence, at any degree (a batched matmul's or
    softmax's order may change with the heads, rows or keys it is given)."""
    B, h, S, d = q.shape
    L = keys.shape[2]
    if causal:  # fresh sequences: query i sees keys 0..i
        mask = torch.ones(S, L, dtype=torch.bool, device=q.device).tril().view(1, 1, S, L)
    elif mask is None:
        mask = torch.ones(1, 1, S, L, dtype=torch.bool, device=q.device)
    return torch.ops.tensorpar.grid_attention(q, keys, values, mask[:, 0], d ** -0.5 if scale is None else scale)


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x))) over the last dimension, [..., V] -> [...], in one fixed order: the max
    (exact in any order), then the sum of exp(x - max) on the kernel, padded with zeros to the key
    grid (torch's reduction may split a row differently as the number of rows changes)."""
    m = x.amax(-1, keepdim=True)
    e = torch.ops.tensorpar.exp_rows(x.reshape(-1, x.shape[-1]), m.reshape(-1))  # (scalar: no vector tails)
    e = F.pad(e, (0, -e.shape[-1] % KEY_GRID))
    total = linear(e, e.new_ones(1, e.shape[-1])).view(*x.shape[:-1], 1)
    return (m + torch.log(total)).squeeze(-1)


def logsumexp_rows(x: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x))) over the last dimension: in this mode the fixed-order ``logsumexp``, else torch's."""
    return logsumexp(x) if enabled() else torch.logsumexp(x, dim=-1)


def grid_product(x: torch.Tensor, layer) -> torch.Tensor:
    """A row-parallel layer's Y = X A + b over its reduction grid (module docstring):
    x [..., in_local] -> [..., out]. ``layer.grid``: (global chunk, local columns) of each chunk
    this rank holds."""
    y = grid_sum(x.reshape(-1, x.shape[-1]), layer.weight, layer.grid, layer, "_grid_plan")  # [T, out]
    if layer.bias is not None:
        y += layer.bias
    return y.view(*x.shape[:-1], layer.out_features)


def grid_sum(x: torch.Tensor, weight: torch.Tensor, grid: list, owner, name: str) -> torch.Tensor:
    """sum over the chunks c of ``grid`` of x[:, c] W[:, c]^T, in the order of their global keys:
    x [T, K_local], W [N, K_local] -> [T, N] on every rank of ``owner.ctx``. ``grid``: (global key,
    local columns) of each chunk this rank holds; a key several ranks hold (a replicated KV head)
    counts once. Each rank computes its chunks' partial products, the group gathers them, and
    every rank adds them in key order; the plan is kept on ``owner`` as ``name``."""
    spans, order, most = _grid_plan(owner, grid, name)
    parts = torch.ops.tensorpar.chunk_products(x, weight, spans)  # [chunks here, T, N]
    if owner.ctx.world_size > 1:
        if parts.shape[0] < most:  # equal shapes for the gather
            parts = torch.cat([parts, parts.new_zeros(most - parts.shape[0], *parts.shape[1:])])
        parts = all_gather_dim(parts, owner.ctx, 0)  # [world * most, T, N]
    return torch.ops.tensorpar.ordered_sum(parts.index_select(0, order))  # chunk 0 + chunk 1 + ...


def _grid_plan(owner, grid: list, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This rank's chunk spans [chunks, 2]; where each global key's partial lies among those the
    group gathers (its first holder's), in key order; and the most chunks a rank holds (the
    gather's padding). Made once per grid (the group's keys: one gather)."""
    plan = getattr(owner, name, None)
    if plan is None:
        spans = torch.tensor([[s.start, s.stop] for _, s in grid], dtype=torch.long).view(-1, 2)
        keys = all_gather_object([g for g, _ in grid], owner.ctx)
        most = max(len(k) for k in keys)
        slots: dict = {}
        for r, owned in enumerate(keys):
            for i, g in enumerate(owned):
                slots.setdefault(g, r * most + i)
        plan = (spans, torch.tensor([slots[g] for g in sorted(slots)], dtype=torch.long), most)
        setattr(owner, name, plan)
    return plan
