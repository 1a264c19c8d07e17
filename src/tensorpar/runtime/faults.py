"""Faults injected on purpose, for tests that prove a check catches them (``EngineArgs.fault``).

- ``drop-all-reduce:L``: layer L's attention output projection returns each rank's partial sum
  without the all-reduce, so the residual stream after layer L differs between the ranks of a
  tensor-parallel group (nothing changes at TP=1).
- ``swap-kv-heads:L``: every rank that holds two or more KV heads in layer L swaps the keys and
  values of its first two (as if their weight rows had been loaded in the wrong order), so a KV
  head that such a rank shares with another rank differs between them.
"""

from __future__ import annotations

from tensorpar.errors import TensorparError

FAULTS = ("drop-all-reduce", "swap-kv-heads")


def parse_fault(fault: str) -> tuple[str, int]:
    kind, _, layer = fault.partition(":")
    if kind not in FAULTS or not layer.isdigit():
        raise TensorparError(f"unknown fault {fault!r}: the test hooks are {', '.join(f + ':LAYER' for f in FAULTS)}")
    return kind, int(layer)


def apply_fault(model, fault: str) -> None:
    """Break ``model`` (this rank's shard) as ``fault`` says."""
    kind, layer = parse_fault(fault)
    attn = model.model.layers[layer].self_attn
    if kind == "drop-all-reduce":
        attn.o_proj.reduce = False
    elif kind == "swap-kv-heads" and attn.num_kv_heads >= 2:
        attn.qkv_proj.register_forward_hook(lambda m, args, out: _swap_first_kv_heads(attn, out))


def _swap_first_kv_heads(attn, qkv):
    """``qkv`` [B, S, (slots + 2 kv) d] with the key and value columns of local KV heads 0 and 1 swapped."""
    d, kv = attn.head_dim, attn.num_kv_heads
    qkv = qkv.clone()
    for start in (attn.num_heads * d, (attn.num_heads + kv) * d):  # the keys, then the values
        a, b = qkv[..., start: start + d].clone(), qkv[..., start + d: start + 2 * d].clone()
        qkv[..., start: start + d], qkv[..., start + d: start + 2 * d] = b, a
    return qkv
