"""FLOPs and bytes per operator for the busiest rank of a tensor-parallel group.

A forward step processes ``T = batch * new_tokens`` tokens. For each operator of a decoder layer
this module states the FLOPs and the bytes moved through memory on one rank; ``latency`` turns
them into time with a roofline. Matmuls follow ``Y[T, n] = X[T, k] W[k, n]``:

    FLOPs = 2 T k n,   bytes = k n w  (weights)  +  T (k + n) a  (activations in and out)

with ``w``/``a`` the bytes per weight and per activation element. Attention over an average
context of ``c`` tokens costs ``4 T c s d`` FLOPs for ``s`` query-head slots (``Q K^T`` and
``P V``); decode reads the KV cache (``batch * c * 2 * kv * d`` elements), prefill reads Q, K, V
and writes O once (a fused, FlashAttention-style kernel). Norms, RoPE, residual adds, activations and cache writes are
memory-bound elementwise operators.

Shards follow tensorpar's shard arithmetic (``tensorpar.partition``) for any degree: the busiest
rank holds ``ceil`` of every even split, and its query heads sit in padded slots (``G`` per local
KV head), so padding costs compute. With a degree that divides everything this is the usual
Megatron split. Per layer, tensor parallelism adds two all-reduces of ``T h a`` bytes (after the
attention output projection and after the MLP); the vocabulary-parallel embedding adds one, and
the LM head gathers ``batch * vocab`` logits.

Mixture of experts (``E`` experts, ``k`` per token, expert parallelism ``ep`` dividing ``tp``):
the experts are split into ``ep`` groups, each expert's MLP over ``tp / ep`` ranks. A step routes
``T k`` token-expert assignments; the busiest group receives ``A = m + sqrt(2 m ln ep)`` of them
(``m = T k / ep``, the balls-into-bins bound) and reads the weights of the ``D`` experts they hit,
``D = E_g (1 - (1 - k/E_g)^(A/k))`` with ``E_g = E / ep``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tensorpar.partition import head_shard, moe_dispatch
from tensorpar.planner.arch import ArchSpec
from tensorpar.planner.hardware import DTYPE_BYTES


@dataclass(frozen=True)
class Shard:
    """What the busiest rank of a TP group holds: query slots (padding included), KV heads, MLP
    width (of each expert it holds a part of), vocabulary rows, and for MoE the experts of its
    group."""

    tp: int
    ep: int
    q_slots: int
    kv_heads: int
    ffn: int
    vocab: int
    experts: int


def busiest_shard(arch: ArchSpec, tp: int, ep: int = 1) -> Shard:
    """The most loaded rank under tensorpar's uneven splits (``ceil`` everywhere, padded slots)."""
    slots, kv = 0, 0
    for rank in range(tp):
        hs = head_shard(arch.heads, arch.kv_heads, tp, rank)
        if (hs.num_slots, hs.num_kv) > (slots, kv):
            slots, kv = hs.num_slots, hs.num_kv
    if arch.moe:
        if tp % ep or arch.experts % ep:
            raise ValueError(f"expert parallelism {ep} must divide both TP ({tp}) and the {arch.experts} experts")
        ffn = math.ceil(arch.ffn / (tp // ep))
        experts = arch.experts // ep
    else:
        ffn = math.ceil(arch.ffn / tp)
        experts = 1
    return Shard(tp=tp, ep=ep, q_slots=slots, kv_heads=kv, ffn=ffn, vocab=math.ceil(arch.vocab / tp),
                 experts=experts)


def engines_refuse(arch: ArchSpec, tp: int) -> str | None:
    """Why engines with even head splits (vLLM, Megatron, TensorRT-LLM) would refuse this degree;
    tensorpar accepts any degree up to the number of query heads."""
    if arch.heads % tp:
        return f"vLLM/Megatron would refuse: {arch.heads} heads not divisible by {tp}"
    if arch.kv_heads % tp and tp % arch.kv_heads:
        return f"vLLM would refuse: {arch.kv_heads} KV heads neither divide nor are divisible by {tp}"
    return None


@dataclass(frozen=True)
class Step:
    """One forward step: ``batch`` sequences, ``new_tokens`` each, attending on average to
    ``context`` tokens, reading ``kv_read`` cached tokens per sequence."""

    batch: int
    new_tokens: int
    context: float
    kv_read: int

    @property
    def tokens(self) -> int:
        return self.batch * self.new_tokens


def prefill_step(batch: int, prompt: int) -> Step:
    """All prompts at once; causal attention sees (P + 1) / 2 tokens on average; nothing cached."""
    return Step(batch, prompt, (prompt + 1) / 2, 0)


def decode_step(batch: int, context: int) -> Step:
    """One new token per sequence, each attending to ``context`` cached tokens (itself included)."""
    return Step(batch, 1, context, context)


@dataclass(frozen=True)
class Op:
    """``kind``: "matmul" (roofline with the matmul rate of its shape: ``rows`` x ``n`` outputs
    over ``k``, ``groups`` such matmuls side by side), "attention" (roofline at the 16-bit
    attention rate) or "memory" (bytes only)."""

    name: str
    kind: str
    flops: float
    bytes: float
    rows: float = 0.0
    n: int = 0
    k: int = 0
    groups: float = 1.0


@dataclass(frozen=True)
class Comm:
    """A collective over the TP group: ``op`` of ``nbytes`` (nccl-tests conventions)."""

    name: str
    op: str
    nbytes: float


@dataclass(frozen=True)
class Precision:
    """Dtypes of the weights, the activations and the KV cache (``fp32``, ``bf16``, ``fp16``,
    ``fp8``, ``int8``); activations are 16-bit unless the weights are fp32."""

    weight_dtype: str
    kv_dtype: str

    @property
    def act_dtype(self) -> str:
        return "fp32" if self.weight_dtype == "fp32" else "bf16"

    @property
    def weight(self) -> int:
        return DTYPE_BYTES[self.weight_dtype]

    @property
    def act(self) -> int:
        return DTYPE_BYTES[self.act_dtype]

    @property
    def kv(self) -> int:
        return DTYPE_BYTES[self.kv_dtype]


def matmul(name: str, rows: float, k: int, n: int, p: Precision) -> Op:
    """``Y[rows, n] = X[rows, k] W[k, n]``: 2 rows k n FLOPs; k n weights + rows (k + n) activations."""
    return Op(name, "matmul", 2.0 * rows * k * n, k * n * p.weight + rows * (k + n) * p.act, rows, n, k)


def memory_op(name: str, nbytes: float) -> Op:
    return Op(name, "memory", 0.0, nbytes)


def attention_ops(arch: ArchSpec, shard: Shard, step: Step, p: Precision, kv_reads: float = 1.0) -> list[Op]:
    """RoPE + cache write, then the attention core (see module doc). ``kv_reads``: how many times
    decode reads each cached byte (1 for kernels that share a KV head across its query heads;
    ``G`` for kernels that read it again for each of the ``G`` query heads of a group)."""
    d, T = arch.head_dim, step.tokens
    ctx = min(step.context, arch.sliding_window) if arch.sliding_window else step.context
    kv_read = min(step.kv_read, arch.sliding_window) if arch.sliding_window else step.kv_read
    q, kv = shard.q_slots * d, shard.kv_heads * d
    rope = 0 if arch.learned_positions else 2 * T * (q + kv) * p.act
    ops = [memory_op("rope+cache write", rope + T * 2 * kv * p.kv)]
    flops = 4.0 * T * ctx * q
    if step.kv_read:
        nbytes = step.batch * kv_read * 2 * kv * p.kv * kv_reads + 2 * T * q * p.act
    else:
        nbytes = T * (2 * q + 2 * kv) * p.act
    ops.append(Op("attention", "attention", flops, nbytes))
    return ops


def expert_load(arch: ArchSpec, shard: Shard, tokens: int) -> tuple[float, float]:
    """(assignments, distinct experts) of the busiest expert group for ``tokens`` tokens."""
    k, ep = arch.experts_per_token, shard.ep
    assignments = float(tokens * k)
    if ep > 1:
        mean = assignments / ep
        assignments = min(assignments, mean + math.sqrt(2.0 * mean * math.log(ep)))
    group = shard.experts
    pick = min(1.0, k / group)
    distinct = group * (1.0 - (1.0 - pick) ** (assignments / k))
    return assignments, max(distinct, min(1.0, assignments))


def mlp_ops(arch: ArchSpec, shard: Shard, step: Step, p: Precision) -> list[Op]:
    """Dense MLP (gated or not) or the MoE block with its router."""
    h, f, T = arch.hidden, shard.ffn, step.tokens
    up = 2 * f if arch.gated_mlp else f
    act_bytes = (3 if arch.gated_mlp else 2) * f * p.act
    if not arch.moe:
        return [matmul("mlp up", T, h, up, p), memory_op("mlp activation", T * act_bytes),
                matmul("mlp down", T, f, h, p)]
    a, dist = expert_load(arch, shard, T)
    rows = a / dist
    routed = T / shard.tp if moe_dispatch_of(arch, shard, T) == "all_to_all" else T  # (each rank routes its slice)
    ops = [matmul("router", routed, h, arch.experts, p)]
    for name, k, n in (("experts up", h, up), ("experts down", f, h)):
        ops.append(Op(name, "matmul", 2.0 * a * k * n, dist * k * n * p.weight + a * (k + n) * p.act, rows, n, k,
                      dist))
    ops.insert(2, memory_op("experts activation", a * act_bytes))
    ops.append(memory_op("experts combine", (a + T) * h * p.act))
    return ops


def moe_dispatch_of(arch: ArchSpec, shard: Shard, tokens: int) -> str:
    """The engine's ``auto`` token dispatch for this MoE shard (``partition.moe_dispatch``)."""
    return moe_dispatch(tokens, arch.experts_per_token, shard.tp, whole_experts=shard.ep == shard.tp)


def layer_ops(arch: ArchSpec, shard: Shard, step: Step, p: Precision,
              kv_reads: float = 1.0) -> tuple[list[Op], list[Comm]]:
    """Every operator of one decoder layer on the busiest rank, and the layer's TP collectives.
    A mixture of experts ends with an all-reduce of the partial sums, or (``all_to_all``
    dispatch) sends each of its slice's T / tp x k (token, choice) rows to the experts and back
    and all-gathers the slices."""
    h, T, d = arch.hidden, step.tokens, arch.head_dim
    q, kv = shard.q_slots * d, shard.kv_heads * d
    norm = memory_op("norm", 2 * T * h * p.act)
    residual = memory_op("residual add", 3 * T * h * p.act)
    ops = [norm, matmul("qkv", T, h, q + 2 * kv, p), *attention_ops(arch, shard, step, p, kv_reads),
           matmul("attention out", T, q, h, p), residual, norm, *mlp_ops(arch, shard, step, p), residual]
    comms = []
    if shard.tp > 1:
        comms = [Comm("attention all-reduce", "all_reduce", T * h * p.act)]
        if arch.moe and moe_dispatch_of(arch, shard, T) == "all_to_all":
            rows = math.ceil(T / shard.tp) * arch.experts_per_token
            comms += [Comm("experts all-to-all", "all_to_all", rows * h * p.act),
                      Comm("experts all-to-all back", "all_to_all", rows * h * p.act),
                      Comm("experts all-gather", "all_gather", T * h * p.act)]
        else:
            comms.append(Comm("mlp all-reduce", "all_reduce", T * h * p.act))
    return ops, comms


def embedding_ops(arch: ArchSpec, shard: Shard, step: Step, p: Precision) -> tuple[list[Op], list[Comm]]:
    """Token (and position) lookup; the vocabulary-parallel embedding sums its slices."""
    T, h = step.tokens, arch.hidden
    reads = 2 if arch.learned_positions else 1
    ops = [memory_op("embedding", (reads + 1) * T * h * p.act)]
    comms = [Comm("embedding all-reduce", "all_reduce", T * h * p.act)] if shard.tp > 1 else []
    return ops, comms


def head_ops(arch: ArchSpec, shard: Shard, step: Step, p: Precision, logit_rows: int) -> tuple[list[Op], list[Comm]]:
    """Final norm, the LM head on ``logit_rows`` rows (each sequence's last token when
    generating), and the all-gather of the vocabulary-parallel logits."""
    T, h = step.tokens, arch.hidden
    ops = [memory_op("final norm", 2 * T * h * p.act), matmul("lm head", logit_rows, h, shard.vocab, p)]
    comms = [Comm("logits all-gather", "all_gather", logit_rows * arch.vocab * p.act)] if shard.tp > 1 else []
    return ops, comms


def weight_bytes_per_layer(arch: ArchSpec, shard: Shard, weight_bytes: float) -> float:
    """Bytes of one layer's weights on the busiest rank (padded query slots included)."""
    h, d = arch.hidden, arch.head_dim
    q, kv = shard.q_slots * d, shard.kv_heads * d
    attn = h * (q + 2 * kv) + q * h
    if arch.qkv_bias or arch.linear_bias:
        attn += q + 2 * kv
    mlp = arch.mlp_matrices * h * shard.ffn * shard.experts
    if arch.moe:
        mlp += h * arch.experts
    norms = arch.layer_norm_params()
    return (attn + mlp + norms) * weight_bytes


def kv_bytes_per_token(arch: ArchSpec, shard: Shard, kv_bytes: float, layers: int) -> float:
    """KV-cache bytes one token adds on the busiest rank across ``layers`` layers."""
    return 2 * layers * shard.kv_heads * arch.head_dim * kv_bytes
