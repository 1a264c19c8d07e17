"""Feed-forward blocks: the MLP (gated or plain) and the single-device mixture of experts
(router, experts, shared expert). At inference on CPU a gated MLP's activation runs as one fused
call (``tensorpar.layers.fused.glu``)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from tensorpar.layers import deterministic, deterministic_grads, fused
from tensorpar.models.config import ModelConfig


def fused_linear(in_features: int, parts: list[tuple[str, int]], bias: bool) -> nn.Linear:
    """One nn.Linear whose output rows stack the checkpoint tensors ``parts`` [(name, rows)]."""
    layer = nn.Linear(in_features, sum(n for _, n in parts), bias=bias)
    layer.fused_parts = tuple(parts)
    return layer


class _SwiGLUFunction(torch.autograd.Function):
    """[gate, up] -> silu(gate) * up, storing only its input for backward.

    d gate = dy * up * s (1 + gate (1 - s)) with s = sigmoid(gate); d up = dy * silu(gate).
    (Autograd through the composite would also keep silu(gate).)
    """

    @staticmethod
    def forward(fctx, gate_up):
        fctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(fctx, dy):
        (gate_up,) = fctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        s = torch.sigmoid(gate)
        return torch.cat([dy * up * s * (1 + gate * (1 - s)), dy * gate * s], dim=-1)


def activation(name: str, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """silu(x) = x sigmoid(x); gelu_new / gelu_pytorch_tanh = 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)));
    gelu = x Phi(x)."""
    if name == "silu":
        return F.silu(x, inplace=inplace)
    return F.gelu(x, approximate="none" if name == "gelu" else "tanh")


class MLP(nn.Module):
    """Gated: down(act(gate(x)) * up(x)), gate and up fused. Plain (GPT-2): down(act(up(x))).
    ``size``: the intermediate size (default the config's; an expert's is its own)."""

    def __init__(self, cfg: ModelConfig, size: int | None = None):
        super().__init__()
        i, h = size or cfg.intermediate_size, cfg.hidden_size
        self.act, self.gated = cfg.hidden_act, cfg.gated_mlp
        if self.gated:
            self.gate_up_proj = fused_linear(h, [("gate_proj", i), ("up_proj", i)], cfg.mlp_bias)
        else:
            self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x):
        if not self.gated:
            return self.down_proj(activation(self.act, self.up_proj(x), inplace=not torch.is_grad_enabled()))
        gate_up = self.gate_up_proj(x)
        if deterministic.enabled() and deterministic_grads.wanted(gate_up) and self.act in fused.ACTIVATIONS:
            return self.down_proj(deterministic_grads.glu(gate_up, self.act))
        if torch.is_grad_enabled():
            if self.act == "silu":
                return self.down_proj(_SwiGLUFunction.apply(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(activation(self.act, gate) * up)
        if self.act in fused.ACTIVATIONS and fused.active(gate_up) and gate_up.is_contiguous():
            return self.down_proj(fused.glu(gate_up, self.act))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(activation(self.act, gate, inplace=True).mul_(up))


class Router(nn.Linear):
    """The router of a mixture of experts (its weight is the checkpoint's ``gate``): for each token
    x, p = softmax(W x) over the E experts (in float32), its top-k (i_1..i_k, torch.topk's order:
    ties to the lower index) with weights w_j = p[i_j] (divided by their sum when ``renormalize``)."""

    def __init__(self, hidden: int, experts: int, top_k: int, renormalize: bool):
        super().__init__(hidden, experts, bias=False)
        self.top_k, self.renormalize = top_k, renormalize

    def route(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in t's dtype, expert indices [T, k]) of tokens ``t`` [T, hidden]."""
        logits = fused.dense_linear(t, self.weight) if deterministic.enabled() else self(t)  # (a row's order alone)
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(t.dtype), index


class Experts(nn.ModuleList):
    """The experts E_0 .. E_{E-1} of a mixture, each an MLP of the expert size, run on the tokens
    routed to them: y = sum_j w_j E_{i_j}(x) over the choices j whose expert is ``held``."""

    def forward(self, t: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                held: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``t`` [T, hidden] and their routing (``weights``, ``index``: [T, k]) -> (y [T, hidden]
        over the experts ``held`` (default: all), the (token, choice) rows routed to each expert [E]).

        The T k rows are sorted by expert once (stably: within an expert, in token order) and each
        held expert runs on its run of them; reading the runs' lengths is the one host sync."""
        k = index.shape[1]
        choice = index.flatten()  # [T k]: row r is token r // k's choice r % k
        order = torch.argsort(choice, stable=True)  # [T k]: the rows grouped by expert
        per_expert = torch.bincount(choice, minlength=len(self))  # [E]
        sizes = per_expert.tolist()
        starts = [0, *accumulate(sizes)]
        w = weights.flatten()  # [T k]
        out = torch.zeros_like(t)
        for e in range(len(self)) if held is None else held:
            if sizes[e]:
                rows = order[starts[e]:starts[e + 1]]  # [n_e]
                tokens = rows // k
                out.index_add_(0, tokens, self[e](t[tokens]) * w[rows, None])
        return out, per_expert


class MoE(nn.Module):
    """A mixture of experts in place of the MLP (Mixtral, Qwen2-MoE, Qwen3-MoE), as transformers
    computes it: y = sum_j w_j E_{i_j}(x) over the router's top-k choices (``Router``); a shared
    expert S adds sigmoid(s x) S(x), s the ``shared_expert_gate`` row.

    Single-device: every expert is here, whole. A plan's ``experts`` style replaces this module by
    ``tensorpar.layers.experts.ExpertParallelMoE``, which places the experts over ranks and takes
    over the router, the experts and the shared expert as they are (``gate``, ``experts``,
    ``shared``, ``shared_expert``, ``shared_expert_gate``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, e = cfg.hidden_size, cfg.num_experts
        self.gate = Router(h, e, cfg.experts_per_token, cfg.norm_topk_prob)
        self.experts = Experts(MLP(cfg, cfg.moe_intermediate_size) for _ in range(e))
        self.shared = cfg.shared_expert_size > 0
        if self.shared:
            self.shared_expert = MLP(cfg, cfg.shared_expert_size)
            self.shared_expert_gate = nn.Linear(h, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        t = x.reshape(-1, shape[-1])  # [T, hidden]
        out, _ = self.experts(t, *self.gate.route(t))
        if self.shared:
            out = out + torch.sigmoid(self.shared_expert_gate(t)) * self.shared_expert(t)
        return out.view(shape)
