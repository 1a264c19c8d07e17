"""The blocks every architecture module assembles: norms, MLPs, the mixture of experts, attention,
the decoder layer and the causal LM around them, shaped by a ``ModelConfig``'s choices (rotary
positions: ``tensorpar.models.rope``).

Plain single-device PyTorch; parallelism is applied afterwards by a plan. Module and parameter
names follow Hugging Face's Llama, except that Q/K/V and gate/up are fused into ``qkv_proj`` and
``gate_up_proj``; each fused linear lists its checkpoint parts in ``fused_parts`` (where an
architecture stores tensors differently, its module says where: ``hf_tensor``). Attention reads
its local head counts from ``num_heads`` / ``num_kv_heads``, which a sharding plan may change.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from tensorpar.layers.attention import AttentionBatch, PackedBatch
from tensorpar.models.config import ModelConfig
from tensorpar.models.rope import Rotary, apply_rope

_NO_DROPOUT = nullcontext()  # reusable: entered on every inference step


def fused_linear(in_features: int, parts: list[tuple[str, int]], bias: bool) -> nn.Linear:
    """One nn.Linear whose output rows stack the checkpoint tensors ``parts`` [(name, rows)]."""
    layer = nn.Linear(in_features, sum(n for _, n in parts), bias=bias)
    layer.fused_parts = tuple(parts)
    return layer


def embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding left uninitialized: weights come from a checkpoint (random init on the meta
    device costs a second of imports)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


# --- norms ------------------------------------------------------------------------------------


class _RMSNormFunction(torch.autograd.Function):
    """y = x r w with r = 1 / sqrt(mean(x^2) + eps), storing only x and r for backward.

    With x_hat = x r and g = dy * w: dw = sum(dy * x_hat) over all but the last dim, and
    dx = r (g - x_hat mean(g * x_hat)). (Autograd through the composite would also keep x_hat.)
    """

    @staticmethod
    def forward(fctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        fctx.save_for_backward(x, r, weight)
        return x * r * weight

    @staticmethod
    def backward(fctx, dy):
        x, r, weight = fctx.saved_tensors
        x_hat = x * r
        dw = (dy * x_hat).reshape(-1, x.shape[-1]).sum(0)
        g = dy * weight
        dx = r * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        return dx, dw, None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (offset + w), normalized in float32 (Gemma: offset 1)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if not self.offset else self.weight.float() + self.offset
        if x.dtype == torch.float32:
            if torch.is_grad_enabled() and not self.offset:
                return _RMSNormFunction.apply(x, w, self.eps)
            return F.rms_norm(x, w.shape, w, self.eps)
        return (w * F.rms_norm(x.float(), w.shape, None, self.eps)).to(x.dtype)


def norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The architecture's norm over ``dim`` (default: hidden) features."""
    if cfg.layer_norm:
        return nn.LayerNorm(dim or cfg.hidden_size, eps=cfg.rms_norm_eps)
    return RMSNorm(dim or cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


# --- activations and MLPs ---------------------------------------------------------------------


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
        if torch.is_grad_enabled():
            if self.act == "silu":
                return self.down_proj(_SwiGLUFunction.apply(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(activation(self.act, gate) * up)
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
        probs = torch.softmax(self(t).float(), dim=-1)  # [T, E]
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


# --- attention and the decoder layer -----------------------------------------------------------


class Attention(nn.Module):
    """Grouped-query attention: softmax(q k^T * scale) v over the keys the batch lets each query
    see (causal, within the layer's sliding window if it has one), with rotary positions and
    optional per-head RMSNorm of q and k before them. In training, ``dropout`` applies to the
    attention probabilities, drawing its mask inside ``dropout_rng()`` (a parallel plan points it
    at a random stream of its choosing; by default the global one)."""

    dropout_site = "attention"
    dropout = 0.0
    dropout_rng = staticmethod(nullcontext)

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d = cfg.head_dim
        self.head_dim = d
        self.num_heads = cfg.num_heads  # local query slots after sharding
        self.num_kv_heads = cfg.num_kv_heads  # local KV heads after sharding
        self.kv_heads = range(cfg.num_kv_heads)  # the global KV heads held (a span of them after sharding)
        self.sliding_window = cfg.window(layer)
        self.scale = cfg.attn_scale
        self.qkv_proj = fused_linear(
            cfg.hidden_size,
            [("q_proj", cfg.num_heads * d), ("k_proj", cfg.num_kv_heads * d), ("v_proj", cfg.num_kv_heads * d)],
            bias=cfg.qkv_bias,
        )
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, batch: AttentionBatch, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: tuple[torch.Tensor, torch.Tensor] | None):
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [B, S, (h + 2 kv) d]; S is the whole sequence under sequence parallelism
        B, S, _ = qkv.shape
        qk = qkv[..., : (h + kv) * d].view(B, S, h + kv, d)
        if self.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :, :h]), self.k_norm(qk[:, :, h:])], dim=2)
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk[:, :, :h], qk[:, :, h:]
        v = qkv[..., (h + kv) * d :].view(B, S, kv, d)
        if isinstance(batch, PackedBatch):  # [1, T]: each part attends on its own, as [rows, tokens]
            out = torch.cat([self._attend(part, *(batch.unpack(i, t) for t in (q, k, v)), cache).reshape(1, -1, h * d)
                             for i, part in enumerate(batch.parts)], dim=1)
        else:
            out = self._attend(batch, q, k, v, cache).reshape(B, S, h * d)
        return self.o_proj(out)

    def _attend(self, batch: AttentionBatch, q, k, v, cache) -> torch.Tensor:
        """q [B, S, h, d], k and v [B, S, kv, d] (the new tokens') -> [B, S, h, d]."""
        keys, values = batch.keys_values(k, v, cache)  # [B, kv, L, d]
        mask, causal = batch.mask(self.sliding_window)
        p = self.dropout if self.training else 0.0
        with self.dropout_rng() if p else _NO_DROPOUT:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, dropout_p=p,
                enable_gqa=self.num_heads != self.num_kv_heads, scale=self.scale,
            )  # [B, h, S, d]
        return out.transpose(1, 2)


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x)); with ``sandwich_norms`` each branch's output is
    normed too before it joins (Gemma: x + post_attention_norm(attn(input_norm(x))), then
    x + post_feedforward_norm(mlp(pre_feedforward_norm(x)))). In training, ``dropout`` applies
    to each branch before it joins the residual stream, its mask drawn inside ``dropout_rng()``."""

    dropout_site = "residual"
    dropout = 0.0
    dropout_rng = staticmethod(nullcontext)

    def _dropout(self, h: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.dropout):
            return h
        with self.dropout_rng():
            return F.dropout(h, self.dropout, training=True)

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.sandwich = cfg.sandwich_norms
        self.input_layernorm = norm(cfg)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = norm(cfg)
        if self.sandwich:
            self.pre_feedforward_layernorm = norm(cfg)
            self.post_feedforward_layernorm = norm(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe(layer) else MLP(cfg)

    def forward(self, x, batch, rope, cache):
        attn = self.self_attn(self.input_layernorm(x), batch, rope, cache)
        if self.sandwich:
            attn = self.post_attention_layernorm(attn)
            x = x + self._dropout(attn)
            mlp = self._dropout(self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))))
        else:
            x = x + self._dropout(attn)
            mlp = self._dropout(self.mlp(self.post_attention_layernorm(x)))
        return x + mlp if torch.is_grad_enabled() else x.add_(mlp)  # the norm keeps x for backward


class DecoderModel(nn.Module):
    """Embeddings, layers and the final norm; a pipeline stage keeps only its ``layers`` (the
    others are empty placeholders, so that parameter names keep the checkpoint's layer numbers),
    the embeddings only if it is the first stage and the norm only if the last."""

    def __init__(self, cfg: ModelConfig, layers: range):
        super().__init__()
        first, last = layers.start == 0, layers.stop == cfg.num_layers
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size) if first else None
        if cfg.learned_positions and first:
            self.embed_positions = embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) if i in layers else nn.Module() for i in range(cfg.num_layers))
        self.norm = norm(cfg) if last else None


class CausalLM(nn.Module):
    """Token ids -> final hidden states (``forward``) -> vocabulary logits (``logits``).

    h_0 = embed(ids) * embed_scale (+ position embeddings), h_l = layer_l(h_{l-1}), out = norm(h_L).

    ``layers``: build only this pipeline stage's layers (default: all). A stage after the first
    takes the previous stage's hidden states instead of token ids; a stage before the last returns
    its last layer's output, un-normed, and has no head.
    """

    def __init__(self, cfg: ModelConfig, layers: range | None = None):
        super().__init__()
        self.config = cfg
        self.layer_ids = range(cfg.num_layers) if layers is None else layers
        self.is_first, self.is_last = self.layer_ids.start == 0, self.layer_ids.stop == cfg.num_layers
        self.model = DecoderModel(cfg, self.layer_ids)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if self.is_last else None
        if cfg.tie_word_embeddings and self.is_first and self.is_last:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rotaries: dict[tuple, Rotary] = {}
        self._layer_rope: list[tuple | None] = []  # per layer: its key into the rotaries
        for i in range(cfg.num_layers):
            base, scaling = cfg.rope(i)
            key = None if cfg.learned_positions else (base, repr(scaling))
            if key is not None and key not in self._rotaries:
                self._rotaries[key] = Rotary(cfg.head_dim, base, scaling)
            self._layer_rope.append(key)

    def rotary(self, batch: AttentionBatch, dtype: torch.dtype, layer: int = 0):
        """Layer ``layer``'s cos and sign-folded sin at the batch's positions ([B, S, 1, D] each),
        or None for a model with learned positions."""
        key = self._layer_rope[layer]
        return None if key is None else self._rotaries[key](batch, dtype)

    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch | None = None, cache=None,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, S] -> final-normed hidden states [B, S, hidden].

        ``batch`` says where the tokens are and what they attend to (default: every row a fresh
        sequence from position 0); ``cache`` is a ``KVCache`` of this model's layers, whose slots
        ``batch`` names. A later pipeline stage starts from the previous one's ``hidden`` [B, S, hidden].
        """
        if batch is None:
            batch = AttentionBatch.fresh(*input_ids.shape, input_ids.device)
        cfg = self.config
        if self.is_first:
            x = self.model.embed_tokens(input_ids)  # [B, S, hidden]
            if cfg.embed_scale is not None:
                x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)  # in the weights' dtype, as transformers does
            if cfg.learned_positions:
                x = x + self.model.embed_positions(batch.positions)
        else:
            x = hidden
        ropes = {key: rot(batch, x.dtype) for key, rot in self._rotaries.items()}
        for j, i in enumerate(self.layer_ids):
            key = self._layer_rope[i]
            x = self.model.layers[i](x, batch, None if key is None else ropes[key],
                                     None if cache is None else cache.layer(j))
        return self.model.norm(x) if self.is_last else x

    def kv_cache_shape(self) -> list[tuple[int, int]]:
        """(local KV heads, head dim) of the cache of every layer this model runs."""
        return [(self.model.layers[i].self_attn.num_kv_heads, self.model.layers[i].self_attn.head_dim)
                for i in self.layer_ids]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., vocab] (gathered over ranks when the head is vocab-parallel)."""
        return self.lm_head(hidden)


# Data flow per layer: the replicated hidden state enters column-parallel QKV and gate/up
# ("all-to-sharded"), attention and the activation run on local heads / local intermediate
# columns, and row-parallel o_proj / down_proj all-reduce back to a replicated hidden state
# ("sharded-to-all"). Two all-reduces per layer. Norms (q/k norms included: they act within a
# head) and position embeddings are replicated.
PLAN: dict[str, str] = {
    "model.embed_tokens": "vocab_embedding",
    "model.layers.*.self_attn.qkv_proj": "colwise_heads",
    "model.layers.*.self_attn.o_proj": "rowwise_heads",
    "model.layers.*.mlp.gate_up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "lm_head": "vocab_head",
}

# Mixture-of-experts models: the dense plan (whose MLP rows a model of MoE layers alone does not
# use) with a shared expert split like a dense MLP; then, applied with the whole group's context
# even where the dense parts are replicated (attention tp=1 beside ep > 1) and after the dense
# plan, the MoE layers: the ``experts`` style makes each an ``ExpertParallelMoE`` whose experts
# are placed over the group's ranks by the expert-parallel degree (a dense MLP between MoE layers
# is left as the dense plan split it).
MOE_PLAN: dict[str, str] = {
    **PLAN,
    "model.layers.*.mlp.shared_expert.gate_up_proj": "colwise",
    "model.layers.*.mlp.shared_expert.down_proj": "rowwise",
}
EXPERT_PLAN: dict[str, str] = {"model.layers.*.mlp": "experts"}
