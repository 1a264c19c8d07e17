"""The expert-parallel mixture of experts: a plain MoE layer's experts placed over a group's ranks,
and the two ways tokens reach them."""

from __future__ import annotations

import torch
from torch import nn

from tensorpar.distributed.collectives import all_gather_dim, all_reduce, all_to_all, reduce_from_tp
from tensorpar.distributed.groups import ParallelContext
from tensorpar.layers import deterministic, fused
from tensorpar.partition import moe_dispatch


class ExpertParallelMoE(nn.Module):
    """Y = sum_j w_j E_{i_j}(X) (+ sigmoid(s X) S(X) with a shared expert S), with the experts
    E_0 .. E_{E-1} placed over the n ranks of group ``ctx``.

    The ranks form len(sets) expert sets of t = n / len(sets) consecutive ranks; set g holds the
    experts ``sets[g]``, each whole (t = 1) or split by intermediate rows over the set's t ranks
    (E_e(x) = sum_r down_r(act(gate_r x) * up_r x), a partial sum per rank). The tokens X [T, hidden]
    enter replicated on every rank and Y leaves so, by one of two dispatches:

    - ``reduce``: every rank routes every token, runs its experts on the tokens routed to them, and
      the partial sums are all-reduced (one all-reduce of [T, hidden]; a shared expert split over
      the same group leaves its partial sum to join the same one).
    - ``all_to_all`` (experts whole, one rank per set): rank r routes only its slice of the tokens
      (T / n), sends each (token, choice) row to the rank holding the chosen expert (a
      variable-sized all-to-all), gets the expert outputs back the same way, weights and adds them,
      and the slices are all-gathered. Traffic per rank: about 2 T k / n rows plus the gather's
      T rows, against the all-reduce's 2 T rows, and the routing is split too.

    ``dispatch``: one of the two, or ``auto`` (``partition.moe_dispatch``: ``all_to_all`` only when
    it moves fewer bytes, with more than 2 k ranks, and for steps of many tokens). ``counts``:
    tokens routed to each expert in the forward passes so far (all experts, local or not), for
    load-balance figures.

    Built from a plain MoE layer ``moe`` (``models.blocks.MoE``), whose modules it takes over
    under the same names: ``gate`` (a router: ``route(t)`` -> weights and expert indices [T, k],
    ``top_k``), ``experts`` (called as ``experts(t, weights, index, held)`` -> (sum over the
    ``held`` experts [T, hidden], rows routed to each expert [E]); those of other sets
    placeholders), and, where ``moe.shared``, ``shared_expert`` and ``shared_expert_gate``.
    """

    def __init__(self, moe: nn.Module, sets: list[list[int]], set_index: int, ctx: ParallelContext,
                 dispatch: str = "auto"):
        super().__init__()
        self.gate, self.experts = moe.gate, moe.experts
        self.sets, self.local, self.ctx, self.dispatch = sets, sets[set_index], ctx, dispatch
        self.whole = len(sets) == ctx.world_size  # each expert lives on one rank (no expert tensor parallelism)
        self.shared = moe.shared
        self.shared_partial = False  # the shared expert's sum over the group is left to this module
        if self.shared:
            self.shared_expert, self.shared_expert_gate = moe.shared_expert, moe.shared_expert_gate
            down = self.shared_expert.down_proj  # split over the same group, without bias: its partial sum joins ours
            if ctx.world_size > 1 and getattr(down, "ctx", None) is not None and down.ctx.world_size == ctx.world_size \
                    and down.bias is None and not deterministic.enabled():
                down.reduce, self.shared_partial = False, True
        self.counts: torch.Tensor | None = None  # [num_experts] tokens routed so far

    def uses_all_to_all(self, tokens: int) -> bool:
        """Whether a step of ``tokens`` tokens goes by ``all_to_all`` (never in training)."""
        if self.ctx.world_size == 1 or not self.whole or torch.is_grad_enabled() or self.dispatch == "reduce":
            return False
        if self.dispatch == "all_to_all":
            return True
        return moe_dispatch(tokens, self.gate.top_k, self.ctx.world_size) == "all_to_all"

    def _count(self, routed: torch.Tensor) -> None:
        self.counts = routed if self.counts is None else self.counts + routed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        t = x.reshape(-1, shape[-1])  # [T, hidden]
        if deterministic.enabled():
            return self._fixed_order(t).view(shape)
        a2a = self.uses_all_to_all(t.shape[0])
        out = self._all_to_all(t) if a2a else self._local_experts(t)
        shared = torch.sigmoid(self.shared_expert_gate(t)) * self.shared_expert(t) if self.shared else None
        if self.shared_partial and not a2a:
            out = out + shared  # one reduction for both
            shared = None
        if not a2a:
            out = reduce_from_tp(out, self.ctx)
        if shared is not None:
            out = out + (all_reduce(shared, self.ctx) if self.shared_partial else shared)
        return out.view(shape)

    def _local_experts(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's experts' part of Y for every token: [T, hidden], a partial sum over the group
        (one host sync: the rows each expert gets)."""
        out, per_expert = self.experts(t, *self.gate.route(t), self.local)
        self._count(per_expert)
        return out

    def _fixed_order(self, t: torch.Tensor) -> torch.Tensor:
        """Y [T, hidden] with every sum in an order no layout or batch changes: with P[t, j, c] the
        partial down projection of chunk c of token t's j-th expert (on the rank that holds that
        chunk of that expert; zero elsewhere, so that summing the group's tensors adds each to
        zeros only, exactly), E[t, j] = P[t, j, 0] + P[t, j, 1] + ..., and Y[t] = w[t, 0] E[t, 0] +
        w[t, 1] E[t, 1] + ..., plus the shared expert's sigmoid(s x) S(x)."""
        weights, index = self.gate.route(t)  # [T, k]
        T, k = index.shape
        chunks = -(-self.experts_intermediate // self.chunk)
        if not hasattr(self, "_grid_tensors"):  # (made once: the grid's local spans and global chunks)
            self._grid_tensors = (torch.tensor([[r.start, r.stop] for _, r in self.grid], dtype=torch.long).view(-1, 2),
                                  torch.tensor([g for g, _ in self.grid], dtype=torch.long))
        spans, mine = self._grid_tensors
        parts = t.new_zeros(T * k, chunks, t.shape[1])  # [(token, choice), chunk, hidden]
        for e in self.local if self.grid else ():  # (a rank may hold no chunk of the experts' rows)
            rows = (index.flatten() == e).nonzero()[:, 0]  # the (token, choice) rows routed to e
            if rows.numel():
                mlp = self.experts[e]
                inner = fused.glu(mlp.gate_up_proj(t[rows // k]), mlp.act)  # [n, intermediate here]
                p = torch.ops.tensorpar.chunk_products(inner, mlp.down_proj.weight, spans)  # [chunks here, n, hidden]
                parts[rows[:, None], mine[None, :]] = p.transpose(0, 1)
        self._count(torch.bincount(index.flatten(), minlength=len(self.experts)))
        if self.ctx.world_size > 1:
            parts = all_reduce(parts, self.ctx)  # each entry one rank's value plus zeros
        each = torch.ops.tensorpar.ordered_sum(parts.transpose(0, 1).contiguous()).view(T, k, -1)  # [T, k, hidden]
        out = torch.ops.tensorpar.ordered_sum((each * weights[..., None]).transpose(0, 1).contiguous())
        if self.shared:
            z = fused.dense_linear(t, self.shared_expert_gate.weight)  # [T, 1]
            gate = 1.0 / (1.0 + torch.ops.tensorpar.exp_rows(-z, z.new_zeros(T)))  # sigmoid, element by element
            out = out + gate * self.shared_expert(t)
        return out

    def _all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """Y for every token [T, hidden], each rank routing its slice and the rows travelling to
        their experts and back (see the class docstring)."""
        ctx, n, k = self.ctx, self.ctx.world_size, self.gate.top_k
        total, step = t.shape[0], -(-t.shape[0] // n)
        lo, hi = min(total, ctx.rank * step), min(total, (ctx.rank + 1) * step)
        mine = t[lo:hi]  # [t_r, hidden]: this rank's slice
        weights, index = self.gate.route(mine)  # [t_r, k]
        choice = index.flatten()  # [t_r * k]
        order = torch.argsort(choice, stable=True)  # the (token, choice) rows grouped by expert
        per_expert = torch.bincount(choice, minlength=len(self.experts))  # [E]
        table = all_gather_dim(per_expert[None], ctx, 0)  # [n, E]: rows each rank routes to each expert
        self._count(table.sum(0))
        owner = torch.empty(len(self.experts), dtype=torch.long, device=t.device)
        for r, experts in enumerate(self.sets):
            owner[experts] = r
        rows = table.new_zeros(n, n).index_add_(1, owner, table)  # [n, n]: rank p -> rank q
        got = all_to_all(mine[order // k], rows, ctx)  # [R, hidden]: by sender, by expert within
        local = table[:, self.local]  # [n, L]
        label = torch.arange(len(self.local), device=t.device).repeat(n).repeat_interleave(local.flatten())  # [R]
        by_expert = torch.argsort(label, stable=True)
        result = torch.empty_like(got)
        start = 0
        for e, size in zip(self.local, local.sum(0).tolist()):
            if size:
                idx = by_expert[start:start + size]
                result[idx] = self.experts[e](got[idx])
            start += size
        back = all_to_all(result, rows.T.contiguous(), ctx)  # [t_r * k, hidden], in ``order``
        part = t.new_zeros(step, t.shape[1])  # [T / n, hidden], padded
        part.index_add_(0, order // k, back * weights.flatten()[order, None])
        return all_gather_dim(part, ctx, 0)[:total]  # [T, hidden]

    def extra_repr(self) -> str:
        return f"experts={len(self.experts)}, local={self.local}, whole={self.whole}, dispatch={self.dispatch}"
