"""Efficiency of one matmul from its shape on one rank: tile and wave quantization.

A GPU matmul ``Y[M, N] = X[M, K] W[K, N]`` is cut into output tiles of ``TILE x TILE``
(128 x 128, the common cuBLAS / CUTLASS tile for 16- and 8-bit operands); each tile is one unit
of work for one streaming multiprocessor (SM). With ``G`` independent matmuls of that shape
(the experts of a grouped MoE GEMM) there are

    tiles = G * ceil(M / TILE) * ceil(N / TILE)

When there are fewer tiles than SMs, libraries split the reduction over K (split-K / stream-K)
to fill the machine, into at most one split per ``SPLIT_K_MIN`` of K:

    splits = max(1, min(floor(SMs / tiles), floor(K / SPLIT_K_MIN)))
    units  = tiles * splits

The units run in waves of ``SMs``; the last wave is partly idle (wave quantization), and the
columns of the edge tiles past ``N`` (and rows past ``M``, once ``M`` fills a tile) are computed
and thrown away (tile quantization):

    wave efficiency = units / (ceil(units / SMs) * SMs)
    tile efficiency = N / (ceil(N / TILE) TILE)  *  (M / (ceil(M / TILE) TILE) if M >= TILE else 1)

Below one tile of rows, kernels switch to narrower tiles (down to matrix-vector products); that
loss is the ``M / (M + n_1/2)`` factor of ``latency``, not counted again here.

The shape efficiency is their product, in (0, 1]. Smaller per-rank matrices at higher TP come
out less efficient: a 128-token prefill of Llama-2-70B's QKV projection (N = 10240 / tp) fills
80 tiles at TP=1 (0.61 of 132 H100 SMs in one wave) and 10 tiles at TP=8 (split 8 ways over K:
80 units, again 0.61), while an 8192-token one fills every wave almost fully.

Devices without an SM count (CPUs) return 1: their small-matmul loss is the ``M / (M + n_1/2)``
factor of ``latency`` alone.
"""

from __future__ import annotations

import math

TILE = 128
SPLIT_K_MIN = 1024


def tiles(m: float, n: int, groups: float = 1.0) -> int:
    """Output tiles of ``groups`` matmuls of ``m x n`` (at least one per group)."""
    return max(1, math.ceil(groups)) * math.ceil(max(m, 1.0) / TILE) * math.ceil(n / TILE)


def wave_efficiency(m: float, n: int, k: int, sms: int, groups: float = 1.0) -> float:
    """Busy fraction of the SMs over the waves of the work units (module docstring)."""
    t = tiles(m, n, groups)
    splits = max(1, min(sms // t, k // SPLIT_K_MIN))
    units = t * splits
    return units / (math.ceil(units / sms) * sms)


def tile_efficiency(m: float, n: int) -> float:
    """Useful fraction of the padded output tiles (rows only once they fill a tile)."""
    cols = n / (math.ceil(n / TILE) * TILE)
    rows = m / (math.ceil(m / TILE) * TILE) if m >= TILE else 1.0
    return cols * rows


def shape_efficiency(m: float, n: int, k: int, sms: int | None, groups: float = 1.0) -> float:
    """Tile x wave efficiency of the shape on ``sms`` SMs; 1 without an SM count or a shape."""
    if not sms or not n or not k:
        return 1.0
    return wave_efficiency(m, n, k, sms, groups) * tile_efficiency(m, n)
