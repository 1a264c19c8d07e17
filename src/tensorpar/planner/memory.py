"""Memory per GPU: weights, KV cache, activations, and (training) gradients and optimizer state.

Inference, on the busiest rank of the busiest pipeline stage:

- weights: the stage's layers (busiest TP shard, padded query slots included), the embedding on
  the first stage, the LM head on the last (a tied head is stored again when it sits on another
  stage), the final norm;
- KV cache: ``batch * min(prompt + output, window) * 2 * layers_in_stage * kv_heads_local *
  head_dim * kv_bytes``; capacity in tokens is what the memory left after everything else holds;
- activations: the largest set of live tensors during a prefill micro-batch of ``T`` tokens:
  the residual stream and normed input (``2 T h``), the larger of the attention projections
  (``T (2 q + 2 kv)``) and the MLP intermediates (``T (up + f)``), all in the activation dtype,
  plus float32 logits of each sequence's last token (local slice and gathered);
- a fixed runtime reserve (CUDA context, library workspaces, communicator buffers; on CPUs the
  Python and torch runtime).

Training activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"), per layer, with ``s`` sequence length, ``b`` micro-batch, ``h`` hidden,
``a`` heads, ``t`` tensor-parallel degree, 16-bit activations and 1-byte dropout masks:

    no parallelism                      s b h (34 + 5 a s / h)
    tensor parallel                     s b h (10 + 24 / t + 5 a s / (h t))
    tensor + sequence parallel          s b h / t (34 + 5 a s / h)
    selective recomputation             the 5 a s / h term (attention scores) is recomputed: dropped
    full recomputation                  2 s b h (only the layer input; / t with sequence parallel)

``activation_bytes_per_layer`` derives the same terms from an architecture's shapes (grouped
KV heads, gated MLP of any width); for GPT-3's shapes it equals the closed forms. With 1F1B
pipelining the first stage holds ``min(pp, microbatches)`` micro-batches of its ``L / pp``
layers. Mixed-precision Adam keeps 18 bytes per parameter (16-bit weights, float32 gradients,
float32 master weights, two float32 moments); the distributed optimizer shards the 12 bytes of
master weights and moments over data parallelism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tensorpar.partition import even_splits
from tensorpar.planner.arch import ArchSpec
from tensorpar.planner.costs import Precision, Shard, expert_load, kv_bytes_per_token, weight_bytes_per_layer
from tensorpar.planner.hardware import GIB, Device

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class MemoryUse:
    """Bytes per GPU (busiest rank), the device's capacity, and the KV cache it can hold."""

    weights: float
    kv_cache: float
    activations: float
    reserve: float
    capacity: float
    kv_bytes_per_token: float
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations + self.reserve + self.optimizer

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def kv_capacity_tokens(self) -> int:
        free = self.capacity - (self.weights + self.activations + self.reserve + self.optimizer)
        if self.kv_bytes_per_token <= 0:
            return 0
        return max(0, int(free // self.kv_bytes_per_token))


def capacity_bytes(device: Device, ranks_per_node: int) -> float:
    cap = device.memory_gib * GIB
    return cap / ranks_per_node if device.memory_shared else cap


def stage_weight_params(arch: ArchSpec, shard: Shard, pp: int) -> list[float]:
    """Parameters each pipeline stage holds on its busiest rank (as bytes at 1 byte each)."""
    per_layer = weight_bytes_per_layer(arch, shard, 1)
    emb = shard.vocab * arch.hidden + arch.learned_positions * arch.hidden
    head = shard.vocab * arch.hidden
    stages = []
    for i, layers in enumerate(even_splits(arch.layers, pp)):
        n = len(layers) * per_layer
        if i == 0:
            n += emb
        if i == pp - 1:
            n += arch.norm_params()
            if not arch.tied_embeddings or pp > 1:
                n += head
        stages.append(n)
    return stages


def inference_activation_bytes(arch: ArchSpec, shard: Shard, tokens: int, sequences: int, p: Precision) -> float:
    """Peak live activations of a prefill micro-batch (module docstring)."""
    h, d = arch.hidden, arch.head_dim
    q, kv = shard.q_slots * d, shard.kv_heads * d
    up = (2 if arch.gated_mlp else 1) * shard.ffn
    mlp_rows = expert_load(arch, shard, tokens)[0] if arch.moe else tokens
    attn = tokens * (2 * q + 2 * kv)
    mlp = mlp_rows * (up + shard.ffn)
    logits = sequences * (shard.vocab + arch.vocab) * 4
    return (2 * tokens * h + max(attn, mlp)) * p.act + logits


def inference_memory(arch: ArchSpec, shard: Shard, pp: int, p: Precision, device: Device, ranks_per_node: int,
                     batch_per_microbatch: int, batch: int, prompt: int, output: int) -> MemoryUse:
    """Memory of the busiest rank of the busiest stage when serving ``batch`` sequences."""
    stage_params = stage_weight_params(arch, shard, pp)
    layer_counts = [len(r) for r in even_splits(arch.layers, pp)]
    seq_len = prompt + output
    kv_tokens = min(seq_len, arch.sliding_window) if arch.sliding_window else seq_len
    act = inference_activation_bytes(arch, shard, batch_per_microbatch * prompt, batch_per_microbatch, p)
    best = None
    for params, layers in zip(stage_params, layer_counts):
        per_token = kv_bytes_per_token(arch, shard, p.kv, layers)
        use = MemoryUse(weights=params * p.weight, kv_cache=batch * kv_tokens * per_token, activations=act,
                        reserve=device.runtime_reserve_gib * GIB, capacity=capacity_bytes(device, ranks_per_node),
                        kv_bytes_per_token=per_token)
        if best is None or use.total > best.total:
            best = use
    return best


# --- training ---------------------------------------------------------------------------------


def korthikanti_no_parallelism(s: int, b: int, h: int, a: int) -> float:
    """``s b h (34 + 5 a s / h)`` bytes per layer."""
    return s * b * h * (34 + 5 * a * s / h)


def korthikanti_tensor_parallel(s: int, b: int, h: int, a: int, t: int) -> float:
    """``s b h (10 + 24 / t + 5 a s / (h t))`` bytes per layer."""
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def korthikanti_sequence_parallel(s: int, b: int, h: int, a: int, t: int) -> float:
    """``s b h / t (34 + 5 a s / h)`` bytes per layer."""
    return s * b * h / t * (34 + 5 * a * s / h)


def activation_bytes_per_layer(arch: ArchSpec, s: int, b: int, t: int = 1, sequence_parallel: bool = False,
                               recompute: str = "none") -> float:
    """Stored activations of one layer for backward (module docstring), from the shapes:

    replicated across TP (split by SP): the QKV and MLP inputs (2 s b h each), the two norm
    inputs (4 s b h), two one-byte dropout masks (2 s b h) = 10 s b h;
    split across TP: Q and the attention-output input (2 s b q each), K and V (2 s b kv each),
    the MLP activation inputs (2 s b up) and the down-projection input (2 s b f) = 24 s b h for
    GPT-3; attention scores (softmax output, its dropout mask and output: 5 a s^2 b) split too.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    h = arch.hidden
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sequence_parallel else 1)
    up = (2 if arch.gated_mlp else 1) * arch.ffn * (arch.experts_per_token if arch.moe else 1)
    f = arch.ffn * (arch.experts_per_token if arch.moe else 1)
    replicated = 10 * sbh
    split = s * b * (2 * arch.q_dim + 2 * arch.kv_dim + 2 * arch.kv_dim + 2 * arch.q_dim + 2 * up + 2 * f)
    scores = 5 * arch.heads * s * s * b if recompute == "none" else 0
    if sequence_parallel:
        return (replicated + split + scores) / t
    return replicated + (split + scores) / t


def optimizer_bytes_per_param(dp: int, distributed_optimizer: bool) -> tuple[float, float]:
    """(weights + gradients, master weights + Adam moments) bytes per parameter."""
    states = 12.0 / dp if distributed_optimizer else 12.0
    return 6.0, states


def training_memory(arch: ArchSpec, shard: Shard, tp: int, pp: int, dp: int, device: Device, ranks_per_node: int,
                    seq_len: int, micro_batch: int, microbatches: int, sequence_parallel: bool, recompute: str,
                    distributed_optimizer: bool) -> MemoryUse:
    """Memory of the first pipeline stage's busiest rank (it holds the most micro-batches)."""
    params = max(stage_weight_params(arch, shard, pp))
    weights_grads, states = optimizer_bytes_per_param(dp, distributed_optimizer)
    layers = math.ceil(arch.layers / pp)
    in_flight = min(pp, microbatches)
    act = layers * in_flight * activation_bytes_per_layer(arch, seq_len, micro_batch, tp, sequence_parallel, recompute)
    logits = 4 * seq_len * micro_batch * shard.vocab  # float32 logits of the vocabulary-parallel loss
    act += logits if pp == 1 else 0.0
    return MemoryUse(weights=params * weights_grads, kv_cache=0.0, activations=act,
                     reserve=device.runtime_reserve_gib * GIB, capacity=capacity_bytes(device, ranks_per_node),
                     kv_bytes_per_token=0.0, optimizer=params * states)
