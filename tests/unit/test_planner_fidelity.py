"""The planner's fidelity formulas against hand-computed values: GEMM tile and wave efficiency,
achievable per-dtype rates, per-family collectives, engine profiles, MoE at batch B, expert
all-to-all volume, interleaved 1F1B."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from tensorpar.planner import PlanError, PlanRequest, plan
from tensorpar.planner.arch import resolve_model
from tensorpar.planner.comm import collective_time
from tensorpar.planner.costs import (
    Op,
    Precision,
    attention_ops,
    busiest_shard,
    decode_step,
    expert_load,
    layer_ops,
    mlp_ops,
)
from tensorpar.planner.engines import ENGINES, resolve_engine
from tensorpar.planner.gemm import shape_efficiency, tile_efficiency, tiles, wave_efficiency
from tensorpar.planner.hardware import BUILTIN_DEVICES
from tensorpar.planner.latency import (
    Placement,
    inference_times,
    op_time,
    rank_speeds,
    stage_parts,
    stage_send_time,
)
from tensorpar.planner.training import pipeline_bubble, training_time

BF16 = Precision("bf16", "bf16")
FP8 = Precision("fp8", "fp8")
H100 = BUILTIN_DEVICES["h100-sxm"]
A100 = BUILTIN_DEVICES["a100-80gb-sxm"]
ONE = Placement(1, 1, 1, 1, 8)


# --- GEMM shape efficiency ------------------------------------------------------------------------


def test_wave_quantization_by_hand():
    # Llama-2-70B QKV (N = 10240), 128-token prefill, K = 8192, 132 SMs
    assert tiles(128, 10240) == 80                              # 1 x 80 tiles: one wave, 80 of 132 busy
    assert wave_efficiency(128, 10240, 8192, 132) == pytest.approx(80 / 132)
    assert wave_efficiency(128, 10240 // 2, 8192, 132) == pytest.approx(120 / 132)   # 40 tiles x 3 splits of K
    assert wave_efficiency(128, 10240 // 8, 8192, 132) == pytest.approx(80 / 132)    # 10 tiles x 8 splits (K / 1024)
    # a large square GEMM: 64 x 64 = 4096 tiles in ceil(4096 / 132) = 32 waves
    assert wave_efficiency(8192, 8192, 8192, 132) == pytest.approx(4096 / (32 * 132))
    # grouped: 2 experts of 1 x 112 tiles (N = 14336) fill ceil(224 / 108) = 3 waves of an A100
    assert wave_efficiency(16, 14336, 4096, 108, groups=2) == pytest.approx(224 / (3 * 108))


def test_tile_quantization_by_hand():
    assert tile_efficiency(100, 200) == pytest.approx(200 / 256)           # fewer rows than a tile: columns only
    assert tile_efficiency(200, 256) == pytest.approx(200 / 256)           # 200 rows in 2 tiles of 128
    assert tile_efficiency(1, 4096) == 1.0
    assert shape_efficiency(4096, 4096, 4096, None) == 1.0                 # CPUs: no SM count


def test_smaller_per_rank_matrices_are_less_efficient():
    # Llama-2-70B's gate+up projection (N = 2 x 28672) for a 512-token prefill
    e1 = shape_efficiency(512, 57344, 8192, 132)                          # 4 x 448 = 1792 tiles, 14 waves
    e8 = shape_efficiency(512, 57344 // 8, 8192, 132)                     # 4 x 56 = 224 tiles, 2 waves
    assert e1 == pytest.approx(1792 / (14 * 132))
    assert e8 == pytest.approx(224 / (2 * 132))
    assert e8 < e1


# --- achievable per-dtype rates -------------------------------------------------------------------


def test_fp8_is_not_twice_bf16_and_attention_stays_16_bit():
    assert H100.matmul_flops("bf16") == pytest.approx(989e12 * 0.75)
    assert H100.matmul_flops("fp8") == pytest.approx(1979e12 * 0.654)
    assert 1.5 < H100.matmul_flops("fp8") / H100.matmul_flops("bf16") < 1.8
    assert A100.matmul_flops("int8") == pytest.approx(624e12 * 0.654)
    assert H100.attention_flops() == pytest.approx(989e12 * 0.5)
    assert A100.attention_flops() == pytest.approx(312e12 * 0.65)
    core = Op("attention", "attention", 1e12, 0.0)
    for p in (BF16, FP8):
        t, compute_bound = op_time(core, 4096, H100, rank_speeds(H100, ONE, p.weight_dtype))
        assert compute_bound and t == pytest.approx(1e12 / (989e12 * 0.5))


# --- collectives by device family -----------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4, 8])
def test_a100_nvlink3_fit(n):
    s = 64 * 1024
    expected = (39.9 + 2.14 * (n - 1)) * 1e-6 + 2 * (n - 1) / n * s / (0.72 * 300e9)
    assert collective_time("all_reduce", s, n, A100) == pytest.approx(expected)


def test_latency_grows_with_ranks_per_family():
    for dev in (A100, H100, BUILTIN_DEVICES["h200-sxm"], BUILTIN_DEVICES["mi300x"]):
        t = [collective_time("all_reduce", 1024, n, dev) for n in (2, 4, 8)]
        assert t[0] < t[1] < t[2], dev.name
    # the H100 (NVLink 4) and A100 (NVLink 3) families differ: 24.1 + 0.86 (n - 1) against 39.9 + 2.14 (n - 1)
    assert collective_time("all_reduce", 8, 8, H100) < collective_time("all_reduce", 8, 8, A100)
    mi = BUILTIN_DEVICES["mi300x"]
    assert mi.peak_tflops["bf16"] == pytest.approx(1307.4) and mi.sm_count == 304


# --- engine profiles ------------------------------------------------------------------------------


def test_engine_all_reduce_latency():
    s = 64 * 1024
    trt = replace(ENGINES["trtllm"], allreduce_latency_us=5.0)
    own = 5e-6 + 2 * 7 / 8 * s / (0.765 * 450e9)
    assert collective_time("all_reduce", s, 8, H100, engine=trt) == pytest.approx(own)
    # the fitted trtllm kernel (35 us) is no faster than NCCL's 24.1 + 0.86 x 7 us: the faster one runs
    assert collective_time("all_reduce", s, 8, H100, engine=ENGINES["trtllm"]) == collective_time("all_reduce", s, 8, H100)
    big = 64 * 1024 * 1024  # beyond its 8 MiB: NCCL's ring or NVLS
    assert collective_time("all_reduce", big, 8, H100, engine=trt) == collective_time("all_reduce", big, 8, H100)


def test_engine_fixed_costs_by_hand():
    arch = resolve_model("llama-2-7b")
    shard = busiest_shard(arch, 1)
    base = inference_times(arch, shard, BF16, H100, ONE, 1, 128, 128)
    vllm = inference_times(arch, shard, BF16, H100, ONE, 1, 128, 128, engine=ENGINES["vllm"])
    # TP=1: no collectives; vLLM adds 630 us per step and 67 - 30 us per layer over the device's
    assert vllm.tpot - base.tpot == pytest.approx(630e-6 + 32 * (67 - 30) * 1e-6)
    assert vllm.ttft - base.ttft == pytest.approx(630e-6 + 32 * (67 - 30) * 1e-6)
    # and 257 us per step for each rank beyond the first
    s4 = busiest_shard(arch, 4)
    p4 = Placement(4, 1, 1, 1, 8)
    a = inference_times(arch, s4, BF16, H100, p4, 1, 128, 128, engine=ENGINES["vllm"])
    b = inference_times(arch, s4, BF16, H100, p4, 1, 128, 128,
                        engine=replace(ENGINES["vllm"], step_overhead_per_rank_us=0.0))
    assert a.tpot - b.tpot == pytest.approx(3 * 257e-6)


def test_engine_memory_efficiency_and_int8_weights():
    s = rank_speeds(A100, ONE, "int8", ENGINES["gpt-fast"])
    assert s.memory_efficiency == pytest.approx(0.72)
    assert s.weight_memory_efficiency == pytest.approx(0.72 * 0.72)
    assert rank_speeds(A100, ONE, "bf16", ENGINES["gpt-fast"]).weight_memory_efficiency == pytest.approx(0.72)
    assert rank_speeds(A100, ONE, "bf16").memory_efficiency == pytest.approx(0.85)


def test_gqa_kv_reads():
    arch = resolve_model("llama-2-70b")          # 64 query heads, 8 KV heads, head_dim 128
    shard = busiest_shard(arch, 4)               # 16 query slots, 2 KV heads
    step = decode_step(32, 1000)
    plain = attention_ops(arch, shard, step, BF16)[1].bytes
    thrice = attention_ops(arch, shard, step, BF16, kv_reads=3.0)[1].bytes
    kv = 32 * 1000 * 2 * 2 * 128 * 2             # batch x context x (K, V) x KV heads x head_dim x bytes
    assert thrice - plain == pytest.approx(2 * kv)


def test_gqa_kv_reads_grow_with_the_group():
    old = replace(ENGINES["trtllm"], gqa_kv_read_fraction=0.25, gqa_kv_read_fraction_8bit=0.75)
    assert old.kv_reads(8, "bf16") == pytest.approx(2.0)        # 0.25 x 8
    assert old.kv_reads(29, "fp8") == pytest.approx(21.75)      # 0.75 x 29: Falcon-180B's group
    assert old.kv_reads(1, "fp8") == 1.0 and old.kv_reads(2, "bf16") == 1.0   # never below one read
    assert ENGINES["trtllm"].kv_reads(29, "fp8") == 1.0         # a kernel built for GQA
    assert replace(old, gqa_kv_read_fraction_8bit=None).kv_reads(8, "int8") == pytest.approx(2.0)
    # a layer's attention reads the cache that many times: Llama-2-70B at TP=8, one KV head per rank
    llama = resolve_model("llama-2-70b")
    shard = busiest_shard(llama, 8)               # 8 query slots, 1 KV head
    step = decode_step(16, 512)
    place = Placement(8, 1, 1, 1, 8)
    speeds = rank_speeds(H100, place, "fp8", old)
    got = stage_parts(llama, shard, step, FP8, H100, place, 16, old).layer.memory
    ref = stage_parts(llama, shard, step, FP8, H100, place, 16, ENGINES["trtllm"]).layer.memory
    cache = 16 * 512 * 2 * 1 * 128 * 1            # batch x context x (K, V) x 1 KV head x head_dim x 1 byte
    assert got - ref == pytest.approx((6.0 - 1.0) * cache / (3350e9 * speeds.memory_efficiency))


def test_bandwidth_per_sm_caps_a_faster_memory():
    h200 = BUILTIN_DEVICES["h200-sxm"]
    eng = replace(ENGINES["trtllm"], memory_efficiency=0.8, attention_memory_efficiency=0.9, bandwidth_per_sm_GBps=25.0)
    cap = 25.0 * 132 / 4800                       # 3.3 TB/s over 4.8: 0.6875
    s = rank_speeds(h200, ONE, "fp8", eng)
    assert s.memory_efficiency == pytest.approx(cap) and s.weight_memory_efficiency == pytest.approx(cap)
    assert s.attention_memory_efficiency == pytest.approx(cap)
    # the H100 (same 132 SMs, 3.35 TB/s) is under the cap: 0.8 x 3.35 = 2.68 < 3.3 TB/s
    s = rank_speeds(H100, ONE, "fp8", eng)
    assert s.memory_efficiency == pytest.approx(0.8) and s.attention_memory_efficiency == pytest.approx(0.9)
    # so the H200 streams weights at the same 3.3 TB/s whatever its datasheet says
    op = Op("w", "matmul", 2.0 * 4096 * 4096, 4096 * 4096, 1, 4096, 4096)
    t, _ = op_time(op, 1, h200, rank_speeds(h200, ONE, "fp8", eng))
    assert t == pytest.approx(op.bytes / 3.3e12)
    assert ENGINES["trtllm"].bandwidth_per_sm_GBps is None


def test_mi300x_rates_are_its_measured_ones():
    mi = BUILTIN_DEVICES["mi300x"]
    assert mi.matmul_flops("fp8") == pytest.approx(2614.9e12 * 0.47)
    assert mi.matmul_flops("bf16") == pytest.approx(1307.4e12 * 0.50)
    assert rank_speeds(mi, ONE, "fp8").memory_efficiency == pytest.approx(0.74)
    # AMD's RCCL acceptance table: 313 GB/s bus bandwidth at 1 GiB over 8 MI300X (6.00 ms)
    assert collective_time("all_reduce", 2 ** 30, 8, mi) == pytest.approx(6.004e-3, rel=0.02)


def test_resolve_engine_and_plan_engine():
    assert resolve_engine("TRTLLM").name == "trtllm"
    with pytest.raises(ValueError, match="unknown engine"):
        resolve_engine("nope")
    r = PlanRequest(model="llama-2-70b", gpu="h100-sxm", gpus=8)
    fast = plan(PlanRequest(**{**r.__dict__, "engine": "gpt-fast"}))
    slow = plan(PlanRequest(**{**r.__dict__, "engine": "vllm"}))
    assert fast.engine.name == "gpt-fast" and plan(r).engine.name == "tensorpar"
    def tp8(result):
        return [c for c in result.configs if c.label == "TP=8"][0].tpot_ms

    assert tp8(fast) < tp8(slow)
    with pytest.raises(PlanError, match="unknown engine"):
        plan(PlanRequest(**{**r.__dict__, "engine": "nope"}))


# --- MoE at batch B -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, distinct", [(1, 2.0), (4, 8 * (1 - 0.75 ** 4)), (64, 8 * (1 - 0.75 ** 64))])
def test_moe_distinct_experts(batch, distinct):
    """E (1 - (1 - k/E)^B) of Mixtral's E = 8, k = 2 at batch B (decode: B tokens)."""
    arch = resolve_model("mixtral-8x7b")
    shard = busiest_shard(arch, 1)
    assignments, d = expert_load(arch, shard, batch)
    assert assignments == 2 * batch and d == pytest.approx(distinct)
    up = [op for op in mlp_ops(arch, shard, decode_step(batch, 100), BF16) if op.name == "experts up"][0]
    weights = d * 4096 * 2 * 14336 * 2                   # distinct experts x h x 2f x 2 bytes
    assert up.bytes == pytest.approx(weights + 2 * batch * (4096 + 2 * 14336) * 2)


def test_expert_all_to_all_volume():
    arch = resolve_model("mixtral-8x7b")
    shard = busiest_shard(arch, 8, ep=8)                 # one whole expert per rank
    T = 512
    _, comms = layer_ops(arch, shard, decode_step(T, 100), BF16)
    a2a = [c for c in comms if c.op == "all_to_all"]
    assert len(a2a) == 2                                 # there and back
    assert all(c.nbytes == pytest.approx(math.ceil(T / 8) * 2 * 4096 * 2) for c in a2a)


# --- interleaved 1F1B -----------------------------------------------------------------------------


def test_interleaved_bubble_and_pipeline():
    assert pipeline_bubble(4, 8) == pytest.approx(3 / 11)
    assert pipeline_bubble(4, 8, 2) == pytest.approx(3 / 19)
    arch = resolve_model("gpt3-175b")
    shard = busiest_shard(arch, 8)
    place = Placement(8, 8, 1, 1, 8)
    t1 = training_time(arch, shard, BF16, A100, place, 2048, 1, 64, "selective", False)
    t2 = training_time(arch, shard, BF16, A100, place, 2048, 1, 64, "selective", False, virtual_stages=2)
    send = stage_send_time(arch, 2048, BF16, A100, place)
    stage1 = t1.pipeline / (64 + 7) - 2 * send               # slowest stage: forward + backward
    stage2 = t2.pipeline / (64 + 7 / 2) - 4 * send
    assert stage1 == pytest.approx(stage2)
    assert t2.bubble == pytest.approx(7 / (2 * 64 + 7)) and t2.step < t1.step


# --- fixed cost per request, decode attention's bandwidth (issue 16, second round) -----------------


def test_prefill_overhead_is_paid_once_on_the_first_token():
    arch = resolve_model("llama-2-7b")
    shard = busiest_shard(arch, 1)
    eng = replace(ENGINES["trtllm"], prefill_overhead_us=2500.0)
    a = inference_times(arch, shard, FP8, H100, ONE, 1, 128, 128, engine=eng)
    b = inference_times(arch, shard, FP8, H100, ONE, 1, 128, 128, engine=replace(eng, prefill_overhead_us=0.0))
    assert a.ttft - b.ttft == pytest.approx(2500e-6)
    assert a.tpot == b.tpot
    # a static batch is prefilled together: once per batch, not per sequence
    a8 = inference_times(arch, shard, FP8, H100, ONE, 8, 128, 128, engine=eng)
    b8 = inference_times(arch, shard, FP8, H100, ONE, 8, 128, 128, engine=replace(eng, prefill_overhead_us=0.0))
    assert a8.ttft - b8.ttft == pytest.approx(2500e-6)
    assert ENGINES["trtllm"].prefill_overhead_us == 0.0 and ENGINES["vllm"].prefill_overhead_us == 0.0


def test_attention_memory_efficiency_by_hand():
    arch = resolve_model("llama-2-7b")                # 32 heads = 32 KV heads of 128: no grouping
    shard = busiest_shard(arch, 1)
    step = decode_step(64, 2048)
    core = attention_ops(arch, shard, step, BF16)[1]
    kv = 64 * 2048 * 2 * 32 * 128 * 2                 # batch x context x (K, V) x KV heads x head_dim x bytes
    assert core.bytes == pytest.approx(kv + 2 * 64 * 4096 * 2)
    eng = replace(ENGINES["trtllm"], attention_memory_efficiency=0.5)
    t, compute_bound = op_time(core, 64, H100, rank_speeds(H100, ONE, "bf16", eng))
    assert not compute_bound and t == pytest.approx(core.bytes / (3350e9 * 0.5))
    # without one, the engine's memory efficiency (0.77 for trtllm) streams the cache too
    t0, _ = op_time(core, 64, H100, rank_speeds(H100, ONE, "bf16", ENGINES["trtllm"]))
    assert t0 == pytest.approx(core.bytes / (3350e9 * ENGINES["trtllm"].memory_efficiency))
    # and the weights' matmuls are not affected
    assert rank_speeds(H100, ONE, "bf16", eng).weight_memory_efficiency == ENGINES["trtllm"].memory_efficiency


def test_engine_gemm_half_rows_by_hand():
    # QKV of Llama-2-7B over a 128-token prompt on an A100: 2 x 128 x 4096 x 12288 FLOPs
    op = Op("qkv", "matmul", 2.0 * 128 * 4096 * 12288, 4096 * 12288 * 2 + 128 * (4096 + 12288) * 2, 128, 12288, 4096)
    shape = shape_efficiency(128, 12288, 4096, A100.sm_count)
    eng = replace(ENGINES["trtllm"], gemm_half_rows=128.0)
    t, compute_bound = op_time(op, 128, A100, rank_speeds(A100, ONE, "bf16", eng))
    assert compute_bound and t == pytest.approx(op.flops / (312e12 * 0.75 * 128 / (128 + 128) * shape))
    # without one, the device's n_1/2 (32 rows)
    t0, _ = op_time(op, 128, A100, rank_speeds(A100, ONE, "bf16", ENGINES["trtllm"]))
    assert t0 == pytest.approx(op.flops / (312e12 * 0.75 * 128 / (128 + 32) * shape))
