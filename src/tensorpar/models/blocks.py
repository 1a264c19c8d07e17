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

import weakref
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from tensorpar.layers import decode_stack, deterministic, deterministic_grads, fused
from tensorpar.layers.attention import AttentionBatch, PackedBatch
from tensorpar.models.config import ModelConfig
from tensorpar.models.feedforward import MLP, Experts, MoE, Router, activation, fused_linear  # noqa: F401
from tensorpar.models.norms import RMSNorm, add_and_norm, norm  # noqa: F401
from tensorpar.models.rope import Rotary, apply_rope

_NO_DROPOUT = nullcontext()  # reusable: entered on every inference step
_DECODE_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # CausalLM -> its DecodeStack, or False


def embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding left uninitialized: weights come from a checkpoint (random init on the meta
    device costs a second of imports)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


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
        if (S == 1 and cache is not None and isinstance(batch, AttentionBatch) and fused.active(qkv)
                and not deterministic.enabled()):  # (deterministic: decode attends as a prompt does)
            # decode: norms, rotation, cache write and attention over the paged cache in one call
            out = fused.decode_attention(qkv.view(B, -1).contiguous(), cache, batch.blocks, batch.positions.view(B),
                                         None if rope is None else (rope[0].view(B, d), rope[1].view(B, d)), h, kv,
                                         d, self.scale if self.scale is not None else d ** -0.5,
                                         self.sliding_window, (self.q_norm, self.k_norm) if self.qk_norm else None)
            return self.o_proj(out.view(B, 1, h * d))
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
        gqa = self.num_heads != self.num_kv_heads
        if deterministic.enabled() and deterministic_grads.wanted(q, keys):  # training: a backward in a fixed order too
            mask, causal = batch.mask(self.sliding_window)
            return deterministic_grads.attention(q.transpose(1, 2), keys, values, mask, causal, self.scale,
                                                 self).transpose(1, 2)
        if gqa and deterministic.enabled():  # one key and value per query head: the same kernel at any grouping
            group = self.num_heads // self.num_kv_heads
            keys, values, gqa = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1), False  # [B, h, L, d]
        mask, causal = batch.mask(self.sliding_window)
        if deterministic.enabled():
            return deterministic.attention(q.transpose(1, 2), keys, values, mask, causal, self.scale).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        with self.dropout_rng() if p else _NO_DROPOUT:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, dropout_p=p,
                enable_gqa=gqa, scale=self.scale,
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

    def decode_halves(self, rope: int, cache: int) -> list | None:
        """This layer as the attention and MLP halves of ``layers.decode_stack`` (rotary table
        ``rope``, KV cache layer ``cache``), or None where it has parts the stack lacks (a mixture
        of experts, an ungated MLP, layer norms)."""
        attn, mlp = self.self_attn, self.mlp
        norms = [self.input_layernorm, self.post_attention_layernorm]
        if self.sandwich:
            norms += [self.pre_feedforward_layernorm, self.post_feedforward_layernorm]
        if type(mlp) is not MLP or not mlp.gated or not all(isinstance(n, RMSNorm) for n in norms):
            return None
        d = attn.head_dim
        return [
            decode_stack.AttentionHalf(
                self.input_layernorm, self.post_attention_layernorm if self.sandwich else None, attn.qkv_proj,
                attn.o_proj, attn.q_norm if attn.qk_norm else None, attn.k_norm if attn.qk_norm else None,
                attn.num_heads, attn.num_kv_heads, d, attn.scale if attn.scale is not None else d ** -0.5,
                attn.sliding_window or 0, rope, cache),
            decode_stack.MLPHalf(
                self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm,
                self.post_feedforward_layernorm if self.sandwich else None, mlp.gate_up_proj, mlp.down_proj, mlp.act),
        ]

    def forward(self, x, batch, rope, cache):
        if not torch.is_grad_enabled():  # inference: residual adds in place, each fused with the norm after it
            attn = self.self_attn(self.input_layernorm(x), batch, rope, cache)
            if self.sandwich:
                h = add_and_norm(self.pre_feedforward_layernorm, x, self.post_attention_layernorm(attn))
                return x.add_(self.post_feedforward_layernorm(self.mlp(h)))
            return x.add_(self.mlp(add_and_norm(self.post_attention_layernorm, x, attn)))
        attn = self.self_attn(self.input_layernorm(x), batch, rope, cache)
        if self.sandwich:
            attn = self.post_attention_layernorm(attn)
            x = x + self._dropout(attn)
            mlp = self._dropout(self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))))
        else:
            x = x + self._dropout(attn)
            mlp = self._dropout(self.mlp(self.post_attention_layernorm(x)))
        return x + mlp  # (out of place: the norm keeps x for backward)


class DecoderModel(nn.Module):
    """Embeddings, layers and the final norm; a pipeline stage keeps only its ``layers`` (the
    others are empty placeholders, so that parameter names keep the checkpoint's layer numbers),
    the embeddings only if it holds the first layer and the norm only if the last."""

    def __init__(self, cfg: ModelConfig, layers):
        super().__init__()
        first, last = 0 in layers, cfg.num_layers - 1 in layers
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size) if first else None
        if cfg.learned_positions and first:
            self.embed_positions = embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) if i in layers else nn.Module() for i in range(cfg.num_layers))
        self.norm = norm(cfg) if last else None


class CausalLM(nn.Module):
    """Token ids -> final hidden states (``forward``) -> vocabulary logits (``logits``).

    h_0 = embed(ids) * embed_scale (+ position embeddings), h_l = layer_l(h_{l-1}), out = norm(h_L).

    ``layers``: build only this pipeline stage's layers (default: all; ascending, and in training
    not necessarily contiguous: an interleaved schedule's rank holds several stages' runs of
    layers). A stage after the first takes the previous stage's hidden states instead of token
    ids; a stage before the last returns its last layer's output, un-normed, and has no head.
    """

    def __init__(self, cfg: ModelConfig, layers=None):
        super().__init__()
        self.config = cfg
        self.layer_ids = range(cfg.num_layers) if layers is None else layers
        self.is_first, self.is_last = 0 in self.layer_ids, cfg.num_layers - 1 in self.layer_ids
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
        x = self.embed(input_ids, batch) if self.is_first else hidden
        if (x.shape[1] == 1 and cache is not None and isinstance(batch, AttentionBatch) and batch.blocks is not None
                and x.shape[0] <= fused.DECODE_ROWS and not self.training and decode_stack.active() and fused.active(x)):
            stack = self._decode_stack()
            if stack:
                return self._decode(stack, x, batch, cache)
        x = self.run_layers(x, batch, self.layer_ids, cache)
        return self.model.norm(x) if self.is_last else x

    def embed(self, input_ids: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """input_ids [B, S] -> the first layer's input [B, S, hidden] (first stage only)."""
        cfg = self.config
        x = self.model.embed_tokens(input_ids)  # [B, S, hidden]
        if cfg.embed_scale is not None:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)  # in the weights' dtype, as transformers does
        if cfg.learned_positions:
            x = x + self.model.embed_positions(batch.positions)
        return x

    def run_layers(self, x: torch.Tensor, batch: AttentionBatch, layers, cache=None) -> torch.Tensor:
        """x through ``layers`` (some of this model's, in order); ``cache`` holds this model's layers
        in ``layer_ids`` order."""
        ropes = {key: rot(batch, x.dtype) for key, rot in self._rotaries.items()}
        for i in layers:
            key = self._layer_rope[i]
            x = self.model.layers[i](x, batch, None if key is None else ropes[key],
                                     None if cache is None else cache.layer(self.layer_ids.index(i)))
        return x

    def _decode_stack(self) -> decode_stack.DecodeStack | None:
        """This stage's layers as one ``DecodeStack`` (built on first use, again when the weights
        are replaced), or None where a layer cannot run there."""
        stack = _DECODE_STACKS.get(self)
        if stack is None or (stack and not stack.current()):
            tables = list(self._rotaries)
            halves = []
            for j, i in enumerate(self.layer_ids):
                key = self._layer_rope[i]
                layer = self.model.layers[i].decode_halves(-1 if key is None else tables.index(key), j)
                if layer is None:
                    halves = []
                    break
                halves += layer
            stack = _DECODE_STACKS[self] = decode_stack.build(halves) or False
        return stack or None

    def _decode(self, stack: decode_stack.DecodeStack, x: torch.Tensor, batch: AttentionBatch, cache) -> torch.Tensor:
        """One new token per row through ``stack``: x [B, 1, hidden] -> as ``forward``."""
        B = x.shape[0]
        ropes = [tuple(t.view(B, -1).float() for t in rot(batch, x.dtype)) for rot in self._rotaries.values()]
        x = x.contiguous()
        delta = stack(x.view(B, -1), cache, batch.blocks, batch.positions.view(B), ropes).view_as(x)
        last = self.model.layers[self.layer_ids[-1]]
        if last.sandwich:
            delta = last.post_feedforward_layernorm(delta)
        return add_and_norm(self.model.norm, x, delta) if self.is_last else x.add_(delta)

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
