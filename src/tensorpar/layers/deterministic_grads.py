"""Deterministic mode's backward passes: training gradients summed in orders the model alone
fixes, so that losses and gradients are bitwise equal at every tensor-parallel degree
(``train --deterministic``).

Each function below is an autograd function whose forward is the engine's own
(``layers.deterministic``: a trainer's logits are a server's, bit for bit) and whose backward adds
every term in a fixed order. With T tokens (every rank holds all of them):

- **Column-parallel** y = x W^T + b (QKV, gate/up, the LM head), W [N_local, K]:
  dW = dY^T X and db = sum_t dY[t] sum over tokens on ``dense_linear``;
  dX = sum_c dY[:, c] W[c, :] runs over the output's grid of chunks (``out_grid``: one per query
  head, key head and value head for QKV, chunks of ``grid_chunk`` rows otherwise), each rank
  computing its chunks' partials, every rank adding them all in chunk order
  (``deterministic.grid_sum``; a replicated KV head's chunk counts once).
- **Row-parallel** y = grid_product(x, W): dX = dY W_local sums over the output dimension,
  dW = dY^T X_local and db over tokens, whole on every rank: nothing to reduce across ranks.
- **Attention** (``grid_attention_backward``): per query head, key after key and query after
  query. A key or value head serves ``g`` query heads; its gradient is the sum of theirs in query
  head order, gathered from the ranks that hold them (``_fold_heads``): every rank holding a copy
  of a KV head computes the same gradient, with nothing left to reduce.
- **Sequence parallelism**: a column-parallel product all-gathers its input's sequence shards and
  keeps its shard of dX (every rank has the whole ordered sum); a row-parallel one keeps its shard
  of y and all-gathers dY's; a norm gathers every token's share of dw before summing it in
  token order. The sequence must then split evenly (padding would move tokens in the sums).
- **Element-wise** functions (the gated MLP's activation) run on scalar kernels both ways: a
  value's bits do not depend on where in a vector loop it falls. **RMSNorm**: the engine's kernel
  forward; dw = sum_t dy[t] x_hat[t] over tokens on ``dense_linear``, dx row by row.
- **Cross-entropy** over the gathered logits z: loss = logsumexp(z) - z_t with the fixed-order
  ``logsumexp``; dz = softmax(z) - onehot(t), element by element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tensorpar.distributed.collectives import SEQ_DIM, all_gather_dim, all_gather_object, split_dim
from tensorpar.layers import deterministic, fused


def wanted(*tensors: torch.Tensor) -> bool:
    """Whether a product is part of a graph that will run backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _tokens_last(t: torch.Tensor) -> torch.Tensor:
    """[T, N] -> [N, T'] contiguous, T' = T padded with zeros to the kernel's 32 lanes: a sum over
    tokens then maps each token to the same lane whatever follows it."""
    return F.pad(t.t(), (0, -t.shape[0] % deterministic.KEY_GRID)).contiguous()


def _over_tokens(g: torch.Tensor) -> torch.Tensor:
    """[T, N] -> [N]: each column's sum over tokens on the fixed-order kernel."""
    gt = _tokens_last(g)
    return fused.dense_linear(gt, gt.new_ones(1, gt.shape[1]))[:, 0]


def _weight_grads(g: torch.Tensor, x: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW = dY^T X [N, K] and db = sum_t dY[t] [N] from g [T, N] and x [T, K]: sums over tokens."""
    return fused.dense_linear(_tokens_last(g), _tokens_last(x)), _over_tokens(g) if bias else None


class _Column(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x, weight, bias, layer):
        # x: [..., K] replicated, or [B, S/p, K] sequence-parallel -> [..., N_local] (whole sequence)
        if layer.sequence_parallel:
            x = all_gather_dim(x, layer.ctx, SEQ_DIM)
        fctx.save_for_backward(x, weight)
        fctx.layer, fctx.has_bias = layer, bias is not None
        return fused.dense_linear(x, weight, bias)

    @staticmethod
    def backward(fctx, grad):
        x, weight = fctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).contiguous()  # [T, N_local]
        x2 = x.reshape(-1, x.shape[-1])  # [T, K]
        grad_w, grad_b = _weight_grads(g, x2, fctx.has_bias)
        layer = fctx.layer
        grad_x = deterministic.grid_sum(g, weight.t().contiguous(), layer.out_grid, layer, "_out_grid_plan")  # [T, K]
        grad_x = grad_x.view_as(x)
        if layer.sequence_parallel:
            grad_x = split_dim(grad_x, layer.ctx, SEQ_DIM)  # this rank's shard of the whole sum
        return grad_x, grad_w, grad_b, None


class _Row(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x, weight, bias, layer):
        # x: [..., K_local] -> [..., N] replicated, or this rank's [B, S/p, N] sequence-parallel
        fctx.save_for_backward(x, weight)
        fctx.has_bias, fctx.layer = bias is not None, layer
        y = deterministic.grid_product(x, layer)
        return split_dim(y, layer.ctx, SEQ_DIM).contiguous() if layer.sequence_parallel else y

    @staticmethod
    def backward(fctx, grad):
        x, weight = fctx.saved_tensors
        if fctx.layer.sequence_parallel:
            grad = all_gather_dim(grad.contiguous(), fctx.layer.ctx, SEQ_DIM)  # [B, S, N]
        g = grad.reshape(-1, grad.shape[-1]).contiguous()  # [T, N]
        grad_w, grad_b = _weight_grads(g, x.reshape(-1, x.shape[-1]), fctx.has_bias)
        grad_x = fused.dense_linear(g, weight.t().contiguous())  # [T, K_local]: a sum over N, whole here
        return grad_x.view_as(x), grad_w, grad_b, None


def column(x: torch.Tensor, layer, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
    """A column-parallel product (``layer.out_grid`` set) whose backward sums in a fixed order."""
    return _Column.apply(x, layer.weight if weight is None else weight, bias, layer)


def row(x: torch.Tensor, layer):
    """A row-parallel product over its reduction grid whose backward sums in a fixed order."""
    return _Row.apply(x, layer.weight, layer.bias, layer)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, keys, values, visible, scale, module):
        # q [B, h, S, d]; keys and values [B, kv, L, d], the local KV heads -> [B, h, S, d]
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # one per query slot
        fctx.save_for_backward(q, keys, values, visible)
        fctx.scale, fctx.module, fctx.group = scale, module, group
        return torch.ops.tensorpar.grid_attention(q, keys, values, visible, scale)

    @staticmethod
    def backward(fctx, grad):
        q, keys, values, visible = fctx.saved_tensors
        dq, dk, dv = torch.ops.tensorpar.grid_attention_backward(q, keys, values, visible, fctx.scale,
                                                                 grad.contiguous())
        dkv = _fold_heads(torch.stack([dk, dv]), fctx.module, fctx.group)  # [2, B, kv, L, d]
        return dq, dkv[0], dkv[1], None, None, None


def attention(q, keys, values, mask, causal: bool, scale: float | None, module) -> torch.Tensor:
    """``deterministic.attention`` for training: q [B, h, S, d], keys and values [B, kv, L, d]
    (``module``: the attention, with its ``q_slots``, ``kv_heads`` and ``q_per_kv``)."""
    S, L, d = q.shape[2], keys.shape[2], q.shape[3]
    if causal:
        mask = torch.ones(S, L, dtype=torch.bool, device=q.device).tril().view(1, 1, S, L)
    elif mask is None:
        mask = torch.ones(1, 1, S, L, dtype=torch.bool, device=q.device)
    return _Attention.apply(q, keys, values, mask[:, 0], d ** -0.5 if scale is None else scale, module)


def _fold_heads(grads: torch.Tensor, module, group: int) -> torch.Tensor:
    """[..., slots, L, d] gradients per local query slot -> [..., kv, L, d] per local KV head:
    KV head j's is the sum over its query heads j g .. j g + g - 1 in order, wherever they are."""
    lead = grads.shape[:-3]
    per_slot = grads.movedim(-3, 0).reshape(grads.shape[-3], -1)  # [slots, rest]
    order, most = _fold_plan(module, group)
    ctx = module.qkv_proj.ctx
    if ctx.world_size > 1:
        if per_slot.shape[0] < most:
            per_slot = torch.cat([per_slot, per_slot.new_zeros(most - per_slot.shape[0], per_slot.shape[1])])
        per_slot = all_gather_dim(per_slot, ctx, 0)  # [world * most, rest]
    folded = [torch.ops.tensorpar.ordered_sum(per_slot.index_select(0, heads)) for heads in order]  # kv x [rest]
    out = torch.stack(folded).view(len(folded), *lead, *grads.shape[-2:])
    return out.movedim(0, -3)


def _fold_plan(module, group: int) -> tuple[list[torch.Tensor], int]:
    """For each local KV head, where its query heads' slots lie among those the group gathers,
    in head order; and the most slots a rank holds. Made once per attention."""
    plan = getattr(module, "_fold_plan", None)
    if plan is None:
        slots = all_gather_object(list(module.q_slots), module.qkv_proj.ctx)
        most = max(len(s) for s in slots)
        where = {h: r * most + i for r, owned in enumerate(slots) for i, h in enumerate(owned) if h is not None}
        g = module.q_per_kv
        order = [torch.tensor([where[h] for h in range(j * g, (j + 1) * g)], dtype=torch.long) for j in module.kv_heads]
        plan = module._fold_plan = (order, most)
    return plan


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(fctx, gate_up, act):
        # [..., 2i] = [gate, up] -> act(gate) * up [..., i]
        gate_up = gate_up.contiguous()
        fctx.save_for_backward(gate_up)
        fctx.act = act
        return fused.glu(gate_up, act)

    @staticmethod
    def backward(fctx, grad):
        (gate_up,) = fctx.saved_tensors
        return torch.ops.tensorpar.glu_backward(gate_up, grad, fused.ACTIVATIONS[fctx.act]), None


def glu(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up on the engine's kernel, with a backward on a scalar kernel."""
    return _GLU.apply(gate_up, act)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x, weight, eps, offset, sequence_ctx):
        # x [..., n] -> x r (offset + w), r = 1 / sqrt(mean(x^2) + eps)
        x = x.contiguous()
        fctx.save_for_backward(x, weight)
        fctx.eps, fctx.offset, fctx.sequence_ctx = eps, offset, sequence_ctx
        return fused.rms_norm(x, weight, eps, offset)

    @staticmethod
    def backward(fctx, dy):
        x, weight = fctx.saved_tensors
        n = x.shape[-1]
        x2, dy2 = x.reshape(-1, n), dy.reshape(-1, n)
        r = torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + fctx.eps)
        x_hat = x2 * r
        shares = dy2 * x_hat  # [T, n]: each token's share of dw
        if fctx.sequence_ctx is not None:  # [B, S/p, n] shards -> every token's, in order
            shares = all_gather_dim(shares.view(*x.shape), fctx.sequence_ctx, SEQ_DIM).reshape(-1, n)
        dw = _over_tokens(shares)  # [n]
        g = dy2 * (weight + fctx.offset)
        dx = r * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        return dx.view_as(x), dw, None, None, None


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """``norm`` (an RMSNorm) of x, forward on the engine's kernel, dw summed over tokens in order
    (``norm.sequence_ctx``: the group whose sequence shards x is one of, under sequence parallelism)."""
    return _RMSNorm.apply(x, norm.weight, norm.eps, norm.offset, getattr(norm, "sequence_ctx", None))


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(fctx, logits, target, ignore_index):
        # logits [N, V] (whole), target [N] -> loss [N]
        lse = deterministic.logsumexp(logits)
        valid = target != ignore_index
        t = torch.where(valid, target, 0)
        loss = torch.where(valid, lse - logits.gather(1, t[:, None])[:, 0], 0.0)
        fctx.save_for_backward(logits, lse, t, valid)
        return loss

    @staticmethod
    def backward(fctx, grad):
        logits, lse, t, valid = fctx.saved_tensors
        g = torch.ops.tensorpar.exp_rows(logits, lse)  # softmax
        g[torch.arange(len(t)), t] -= 1.0
        return g * torch.where(valid, grad, 0.0)[:, None], None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-token loss [...] from whole logits [..., V]: logsumexp(z) - z_t, 0 where ignored."""
    return _CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                               ignore_index).view(target.shape)


class _Total(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x):
        fctx.shape = x.shape
        return _over_tokens(x.reshape(-1, 1))[0]

    @staticmethod
    def backward(fctx, grad):
        return grad.expand(fctx.shape)


def total(x: torch.Tensor) -> torch.Tensor:
    """The sum of every element of ``x``, in one fixed order (a scalar)."""
    return _Total.apply(x)
