"""Fused CPU kernels of the decode step, and their plain-torch twins.

A decode step runs about forty small operations per layer between its weight products: norms,
rotary positions, KV-cache writes, attention, activations, residual adds. Each is a call with its
own dispatch and parallel region, starting on caches that the product before it has just flushed.
C++ operators (``csrc/``, compiled on first use with torch's own extension builder and cached:
``build_directory``) do that work in one call each, and stream the weights themselves:

- ``rms_norm(x, residual, w)``: x += residual (in place, when given), then
  y = x / sqrt(mean(x^2) + eps) * (w + offset);
- ``glu(gate_up, act)``: act(gate) * up, act silu or gelu (tanh);
- ``decode_attention``: one new token per row: its query and key heads RMS-normed and rotated
  where the model does that, its key and value written into the paged KV cache through the row's
  block table, then softmax(q k^T scale) v over the row's keys (within a sliding window), read
  from the cache blocks in place with an online softmax: no gather of the row's keys;
- ``dense_linear`` (float32 / bfloat16 W [out, in]) and ``codes_linear`` (8- or 4-bit codes in
  groups with a scale and zero each): y = x W^T for a step's few rows (at most ``DECODE_ROWS``),
  W read once, row by row, in one parallel region over the output rows.

Each computes in float32 whatever the dtype (float32 or bfloat16). ``available()`` says whether
the kernels are built; where they cannot be (no compiler), or with ``TENSORPAR_FUSED=0``, the
model runs its plain torch operations instead, with one line saying so. The ``*_reference``
functions are the same math in plain torch; tests run both on the same inputs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("decode_cpu.cpp", "linear_cpu.cpp", "layer_cpu.cpp")]
HEADERS = [CSRC / "kernels.h"]
DECODE_ROWS = 16  # products of at most this many rows of x stream the weights here; more go to torch's GEMM
SILU, GELU_TANH = 0, 1
ACTIVATIONS = {"silu": SILU, "gelu_pytorch_tanh": GELU_TANH, "gelu_new": GELU_TANH}

_state: dict = {"loaded": None, "on": os.environ.get("TENSORPAR_FUSED", "1") != "0",
               "quantize_x": os.environ.get("TENSORPAR_Q8_ACTIVATIONS", "0") == "1"}


CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]  # (-fopenmp: torch's own OpenMP runtime)


def build_directory() -> Path:
    """Where the kernels are built: one directory per content of the sources and flags, holding
    its own copy of the sources, so that checkouts with the same sources share one build and
    different ones never rebuild each other's."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(CFLAGS).encode()).hexdigest()[:16]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    return root / "tensorpar" / digest


def _load() -> bool:
    """Build (first use on this machine) or load the kernels; False, said once, where they cannot be."""
    if _state["loaded"] is None:
        try:
            from torch.utils.cpp_extension import load

            build = build_directory()
            build.mkdir(parents=True, exist_ok=True)
            sources = []
            for source in HEADERS + SOURCES:
                copy = build / source.name
                if not copy.exists():  # written whole, then renamed: a concurrent rank never reads half a file
                    part = build / f".{source.name}.{os.getpid()}"
                    shutil.copyfile(source, part)
                    os.replace(part, copy)
                if source in SOURCES:
                    sources.append(str(copy))
            load(name=f"tensorpar_kernels_{build.name}", sources=sources, build_directory=str(build),
                 is_python_module=False, verbose=False, extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])
            _state["loaded"] = True
        except Exception as e:  # no compiler, no ninja, a build error: run unfused
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
            print(f"tensorpar: warning: cannot build the fused CPU decode kernels ({first}); "
                  "decode runs unfused (slower)", file=sys.stderr)
            _state["loaded"] = False
    return _state["loaded"]


def available() -> bool:
    """Whether the fused kernels run (built, and not turned off)."""
    return _state["on"] and _load()


def active(x: torch.Tensor) -> bool:
    """Whether inference on ``x`` goes through the fused kernels: on CPU, float32 or bfloat16,
    outside autograd, with the kernels available."""
    return (_state["on"] and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_grad_enabled() and _load())


@contextmanager
def switched(state: dict, key: str, value):
    """Run the enclosed code with ``state[key] = value``, the value before restored after."""
    before = state[key]
    state[key] = value
    try:
        yield
    finally:
        state[key] = before


def enabled(on: bool):
    """Run the enclosed code with the fused kernels on or off (tests compare the two)."""
    return switched(_state, "on", on)


def streams(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x W^T goes through ``dense_linear``: a decode step's few rows, a float32 or bfloat16
    weight stored [out, in]."""
    return (x.numel() // x.shape[-1] <= DECODE_ROWS and weight.dtype in (torch.float32, torch.bfloat16)
            and weight.is_contiguous() and active(x))


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[..., K] -> [..., N]: x W^T + b, W [N, K] read once, row by row."""
    lead = x.shape[:-1]
    return torch.ops.tensorpar.dense_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*lead, weight.shape[0])


def codes_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                 bits: int) -> torch.Tensor:
    """[T, K] -> [T, N] for W as codes in groups: W[n, k] c-summed as
    y[t, n] = sum_g scale[n, g] dot(c[n, g], x[t, g]) + zero[n, g] sum(x[t, g]).
    With ``quantizes_activations()``, 4-bit codes meet x quantized to 8 bits."""
    return torch.ops.tensorpar.codes_linear(x, codes, scale, zero, group, bits, _state["quantize_x"])


def quantizes_activations() -> bool:
    """Whether products of 4-bit codes take x quantized to 8 bits, as llama.cpp's do: per block
    of 32 values x_b ~ d q_b, d = max|x_b| / 127, q_b int8, each dot product of 64 codes then one
    VNNI instruction (u8 x s8 -> int32) scaled by the two blocks' scales; the zero terms keep
    float sums of x. About 1.6x faster on the 4-bit products, at a cost in accuracy that depends
    on the model's activations (BENCHMARKS.md, "8-bit activations"), so it is asked for:
    ``TENSORPAR_Q8_ACTIVATIONS=1`` (or ``q8_activations()``), on a CPU with AVX-512 VNNI."""
    return _state["quantize_x"] and available() and torch.ops.tensorpar.vnni()


def q8_activations(on: bool = True):
    """Run the enclosed code with (or without) 8-bit activations in the 4-bit products."""
    return switched(_state, "quantize_x", on)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """[..., n] -> [..., n]: x += residual in place (when given), then the norm of x."""
    return torch.ops.tensorpar.rms_norm(x, residual, weight, eps, offset)


def glu(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """[..., 2i] -> [..., i]: act(gate) * up."""
    return torch.ops.tensorpar.glu(gate_up, ACTIVATIONS[act])


def decode_attention(qkv: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], blocks: torch.Tensor,
                     positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, heads: int,
                     kv_heads: int, head_dim: int, scale: float, window: int | None,
                     qk_norms: tuple | None = None) -> torch.Tensor:
    """qkv [B, (h + 2 kv) d] of one new token per row -> [B, h d] (see the module docstring).
    ``rope``: cos and sign-folded sin, [B, d] each; ``qk_norms``: the q and k head ``RMSNorm``s."""
    q_norm = k_norm = None
    eps = offset = 0.0
    if qk_norms is not None:
        q_norm, k_norm = qk_norms[0].weight, qk_norms[1].weight
        eps, offset = qk_norms[0].eps, qk_norms[0].offset
    cos, sin = rope if rope is not None else (None, None)
    return torch.ops.tensorpar.decode_attention(qkv, cache[0], cache[1], blocks, positions, cos, sin, q_norm, k_norm,
                                                heads, kv_heads, head_dim, scale, window or 0, eps, offset)


# ---- the plain-torch twins -------------------------------------------------------------------


def rms_norm_reference(x, weight, eps, offset=0.0, residual=None):
    if residual is not None:
        x.add_(residual)
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (y * (weight.float() + offset)).to(x.dtype)


def glu_reference(gate_up, act):
    gate, up = gate_up.float().chunk(2, dim=-1)
    a = torch.nn.functional.silu(gate) if ACTIVATIONS[act] == SILU else torch.nn.functional.gelu(gate, approximate="tanh")
    return (a * up).to(gate_up.dtype)


def decode_attention_reference(qkv, cache, blocks, positions, rope, heads, kv_heads, head_dim, scale, window,
                               qk_norms=None):
    """The same as ``decode_attention``, a row and a head at a time in plain torch."""
    B, d, group = qkv.shape[0], head_dim, heads // kv_heads
    k_cache, v_cache = cache
    bs = k_cache.shape[1]
    out = torch.empty(B, heads * d, dtype=qkv.dtype)
    for b in range(B):
        pos = int(positions[b])
        heads_ = qkv[b].float().view(heads + 2 * kv_heads, d)
        q, k, v = heads_[:heads], heads_[heads: heads + kv_heads], heads_[heads + kv_heads:]
        if qk_norms is not None:
            q = rms_norm_reference(q.clone(), qk_norms[0].weight, qk_norms[0].eps, qk_norms[0].offset)
            k = rms_norm_reference(k.clone(), qk_norms[1].weight, qk_norms[1].eps, qk_norms[1].offset)
        if rope is not None:
            cos, sin = rope[0][b].float(), rope[1][b].float()
            q, k = (t * cos + t.roll(d // 2, dims=-1) * sin for t in (q, k))
        k_cache[blocks[b, pos // bs], pos % bs] = k.to(k_cache.dtype)
        v_cache[blocks[b, pos // bs], pos % bs] = v.to(v_cache.dtype)
        first = max(0, pos - window + 1) if window else 0
        slots = [(int(blocks[b, p // bs]), p % bs) for p in range(first, pos + 1)]
        keys = torch.stack([k_cache[i, j] for i, j in slots]).float()  # [L, kv, d]
        values = torch.stack([v_cache[i, j] for i, j in slots]).float()
        for head in range(heads):
            g = head // group
            p = torch.softmax(keys[:, g] @ q[head] * scale, dim=0)
            out[b, head * d: (head + 1) * d] = (p @ values[:, g]).to(qkv.dtype)
    return out
