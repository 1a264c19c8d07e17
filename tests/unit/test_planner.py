"""The planner's formulas against hand-computed values, its search and recommendation, and its
errors for nonsense input."""

from __future__ import annotations

import json
import math

import pytest

from tensorpar.planner import PlanError, PlanRequest, plan
from tensorpar.planner.arch import BUILTIN_MODELS, from_hf_config, from_model_config, resolve_model
from tensorpar.planner.report import render_json, render_table
from tensorpar.planner.comm import (
    collective_time,
    p2p_time,
    ring_all_gather_time,
    ring_all_reduce_time,
    sharp_all_reduce_time,
)
from tensorpar.planner.costs import (
    Precision,
    busiest_shard,
    decode_step,
    engines_refuse,
    expert_load,
    kv_bytes_per_token,
    layer_ops,
    matmul,
    prefill_step,
    weight_bytes_per_layer,
)
from tensorpar.planner.hardware import BUILTIN_DEVICES, device_from_dict, resolve_device
from tensorpar.planner.latency import Placement, inference_times, op_time, rank_speeds
from tensorpar.planner.memory import (
    activation_bytes_per_layer,
    korthikanti_no_parallelism,
    korthikanti_sequence_parallel,
    korthikanti_tensor_parallel,
)
from tensorpar.planner.search import Config, recommend
from tensorpar.planner.training import model_flops, pipeline_bubble, training_flops

BF16 = Precision("bf16", "bf16")
H100 = BUILTIN_DEVICES["h100-sxm"]


# --- architecture: parameter counts ---------------------------------------------------------------


def llama_params(V, h, L, f, q, kv, tied):
    """Embedding (+ untied head) + L * (W_qkv + W_o + 3 MLP matrices + 2 norms) + final norm."""
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
    return V * h * (1 if tied else 2) + L * per_layer + h


@pytest.mark.parametrize("name, expected", [
    ("llama-2-7b", 6_738_415_616),      # the published checkpoints' parameter counts
    ("llama-2-13b", 13_015_864_320),
    ("llama-2-70b", 68_976_648_192),
    ("llama-3-8b", 8_030_261_248),
    ("llama-3-70b", 70_553_706_496),
    ("llama-3.1-405b", 405_853_388_800),
    ("mistral-7b", 7_241_732_096),
    ("qwen2.5-72b", 72_706_203_648),
    ("mixtral-8x7b", 46_702_792_704),
    ("smollm2-135m", 134_515_008),       # = bench.json's 538,060,032 float32 weight bytes / 4
])
def test_builtin_parameter_counts(name, expected):
    assert resolve_model(name).total_params() == expected


def test_parameter_count_formulas_by_hand():
    assert resolve_model("llama-2-70b").total_params() == llama_params(32000, 8192, 80, 28672, 8192, 1024, False)
    assert resolve_model("smollm2-135m").total_params() == llama_params(49152, 576, 30, 1536, 576, 192, True)
    # Qwen2: q, k, v biases
    assert resolve_model("qwen2.5-72b").total_params() == llama_params(152064, 8192, 80, 29568, 8192, 1024, False) \
        + 80 * (8192 + 2 * 1024)
    # GPT-3: 12 L h^2 matrices, per layer 13 h of biases and LayerNorms, tied embedding, 2048 positions
    L, h, V = 96, 12288, 50257
    assert resolve_model("gpt3-175b").total_params() == 12 * L * h * h + 13 * L * h + V * h + 2048 * h + 2 * h
    # Mixtral: 8 experts, router h x 8; a token multiplies by 2 experts
    mix = resolve_model("mixtral-8x7b")
    expert = 3 * 4096 * 14336
    assert mix.active_params_per_token() == mix.total_params() - 32 * 6 * expert - 32000 * 4096


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "gpt2"])
def test_planner_counts_match_the_engine_model(arch):
    """Principle 9: the planner reads the same ModelConfig the engine builds its model from."""
    from helpers import TINY_CONFIGS

    from tensorpar.models.config import ModelConfig
    from tensorpar.models.registry import checkpoint_shapes

    cfg = ModelConfig.from_hf(TINY_CONFIGS[arch])
    engine = sum(math.prod(s) for s in checkpoint_shapes(cfg).values())
    assert from_model_config(cfg).total_params() == engine
    smol = ModelConfig.from_hf(BUILTIN_MODELS["smollm2-135m"])
    assert from_model_config(smol).total_params() == sum(math.prod(s) for s in checkpoint_shapes(smol).values())


@pytest.mark.parametrize("name, params", [("qwen3-32b", 32.8e9), ("gemma-3-27b", 27.0e9)])
def test_published_qwen3_and_gemma3_configs_plan(name, params, tmp_path):
    """A Qwen3 or Gemma 3 config.json goes through the engine's ModelConfig: sizes as published."""
    (tmp_path / "config.json").write_text(json.dumps(BUILTIN_MODELS[name]))
    arch = resolve_model(str(tmp_path))
    assert arch.head_norms and arch.total_params() == pytest.approx(params, rel=0.02)
    assert arch.norms_per_layer == (4 if name.startswith("gemma") else 2)
    assert arch.sliding_window is None  # Gemma's global layers keep the whole context


def test_config_json_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BUILTIN_MODELS["mixtral-8x7b"]))
    assert resolve_model(str(tmp_path)).experts == 8
    assert resolve_model(str(tmp_path / "config.json")).experts_per_token == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="unsupported model_type 't5'"):
        resolve_model(str(bad))
    with pytest.raises(ValueError, match="unknown model 'nope'.*llama-2-70b"):
        resolve_model("nope")
    gpt2 = from_hf_config({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12})
    assert gpt2.total_params() == 124_439_808  # GPT-2 small


# --- shards, FLOPs and bytes ------------------------------------------------------------------------


def test_busiest_shard_follows_tensorpar_uneven_rules():
    smol = resolve_model("smollm2-135m")  # 9 heads, 3 KV heads (groups of 3)
    s = busiest_shard(smol, 2)
    # rank 0 holds query heads 0-4: KV heads 0 and 1, padded to 3 slots each
    assert (s.q_slots, s.kv_heads, s.ffn, s.vocab) == (6, 2, 768, 24576)
    big = busiest_shard(resolve_model("llama-2-70b"), 16)
    assert (big.q_slots, big.kv_heads) == (4, 1)  # 8 KV heads on 16 ranks: replicated
    assert engines_refuse(smol, 2) == "vLLM/Megatron would refuse: 9 heads not divisible by 2"
    assert engines_refuse(resolve_model("llama-2-70b"), 8) is None


def test_matmul_flops_and_bytes():
    op = matmul("x", 4, 8, 16, BF16)
    assert op.flops == 2 * 4 * 8 * 16
    assert op.bytes == 8 * 16 * 2 + 4 * (8 + 16) * 2


def test_layer_flops_llama2_7b_decode():
    arch = resolve_model("llama-2-7b")
    ops, comms = layer_ops(arch, busiest_shard(arch, 1), decode_step(1, 100), BF16)
    mm = sum(o.flops for o in ops if o.kind == "matmul")
    assert mm == 2 * (4096 * (4096 + 2 * 4096) + 4096 * 4096 + 3 * 4096 * 11008) == 404_750_336
    attn = sum(o.flops for o in ops if o.kind == "attention")
    assert attn == 4 * 1 * 100 * 4096  # Q K^T and P V over 100 cached tokens
    kv_read = [o for o in ops if o.kind == "attention"][0].bytes
    assert kv_read == 100 * 2 * 4096 * 2 + 2 * 4096 * 2  # K and V of 100 tokens, q in and out
    assert comms == []
    _, comms = layer_ops(arch, busiest_shard(arch, 2), prefill_step(2, 10), BF16)
    assert [c.nbytes for c in comms] == [2 * 10 * 4096 * 2] * 2  # two all-reduces of T h a


def test_kv_cache_bytes():
    arch = resolve_model("llama-2-70b")
    assert kv_bytes_per_token(arch, busiest_shard(arch, 1), 2, 80) == 2 * 80 * 8 * 128 * 2 == 327_680
    assert kv_bytes_per_token(arch, busiest_shard(arch, 8), 2, 80) == 327_680 // 8
    assert kv_bytes_per_token(arch, busiest_shard(arch, 16), 2, 80) == 327_680 // 8  # replicated KV heads


def test_weights_per_gpu_llama2_70b_tp8():
    arch = resolve_model("llama-2-70b")
    s = busiest_shard(arch, 8)
    layer = 8192 * (1024 + 256) + 1024 * 8192 + 3 * 8192 * 3584 + 2 * 8192
    assert weight_bytes_per_layer(arch, s, 2) == 2 * layer
    cfg = next(c for c in plan(PlanRequest("llama-2-70b", "h100-sxm", 8)).configs if c.tp == 8)
    assert cfg.memory.weights == 2 * (80 * layer + 2 * 4000 * 8192 + 8192)


def test_expert_load():
    mix = resolve_model("mixtral-8x7b")
    a, d = expert_load(mix, busiest_shard(mix, 8, 1), tokens=1)
    assert (a, d) == (2.0, 2.0)  # one token, two experts, each split over 8 ranks
    a, d = expert_load(mix, busiest_shard(mix, 8, 8), tokens=1)
    assert d == 1.0  # one whole expert on the busiest rank
    assert a == pytest.approx(0.25 + math.sqrt(2 * 0.25 * math.log(8)))


# --- communication ----------------------------------------------------------------------------------


def test_collective_formulas():
    S = 1 << 20
    assert ring_all_reduce_time(S, 8, 20e-6, 300e9) == pytest.approx(20e-6 + 1.75 * S / 300e9)
    assert ring_all_reduce_time(S, 1, 20e-6, 300e9) == 0.0
    assert sharp_all_reduce_time(S, 8, 20e-6, 270e9) == pytest.approx(20e-6 + S / 270e9)
    assert ring_all_gather_time(S, 4, 10e-6, 100e9) == pytest.approx(10e-6 + 0.75 * S / 100e9)
    assert p2p_time(S, 5e-6, 100e9) == pytest.approx(5e-6 + S / 100e9)


def test_collective_time_on_h100():
    # 16 KiB on 8 GPUs: alpha(8) = 24.1 + 7 * 0.86 us; NVLS beats the ring (S / 270 vs 1.75 S / 344 GB/s)
    t = collective_time("all_reduce", 16384, 8, H100)
    assert t == pytest.approx((24.1 + 7 * 0.86) * 1e-6 + 16384 / (0.6 * 450e9))
    # 2 GPUs: the ring moves 1 x S, cheaper than NVLS
    t2 = collective_time("all_reduce", 1 << 26, 2, H100)
    assert t2 == pytest.approx((24.1 + 0.86) * 1e-6 + (1 << 26) / (0.765 * 450e9))
    # across 2 nodes: inter-node latency, node bandwidth shared by 4 concurrent groups
    t3 = collective_time("all_reduce", 1 << 26, 16, H100, nodes=2, concurrent=4)
    assert t3 == pytest.approx((45 + 15 * 0.5) * 1e-6 + 2 * 15 / 16 * (1 << 26) / (0.9 * 400e9 / 4))


# --- roofline, pipeline, training ---------------------------------------------------------------------


def test_roofline_op_time():
    speeds = rank_speeds(H100, Placement(1, 1, 1, 1, 8), "bf16")
    mem = matmul("gemv", 1, 8192, 8192, BF16)
    t, compute_bound = op_time(mem, 1, H100, speeds)
    assert not compute_bound and t == pytest.approx(mem.bytes / (3350e9 * 0.85))
    big = matmul("gemm", 8192, 8192, 8192, BF16)
    t, compute_bound = op_time(big, 8192, H100, speeds)
    assert compute_bound
    # 64 x 64 = 4096 tiles of 128 x 128 in ceil(4096 / 132) = 32 waves of the 132 SMs
    assert t == pytest.approx(big.flops / (989e12 * 0.75 * 8192 / (8192 + 32) * 4096 / (32 * 132)))


def test_pipeline_bubble():
    assert pipeline_bubble(4, 12) == pytest.approx(3 / 15)
    assert pipeline_bubble(1, 7) == 0.0
    arch = resolve_model("llama-2-7b")
    r = inference_times(arch, busiest_shard(arch, 1), BF16, H100, Placement(1, 4, 1, 1, 8), 2, 128, 16)
    assert r.bubble == pytest.approx(0.5)  # 2 micro-batches for 4 stages
    pre = r.prefill
    assert r.ttft == pytest.approx(sum(pre.stages) + 3 * pre.send + 1 * max(pre.stages))


def test_training_flops():
    assert training_flops(70e9, 1e6) == 6 * 70e9 * 1e6
    gpt3 = resolve_model("gpt3-175b")
    D = 2048 * 1536
    assert model_flops(gpt3, 2048, D) == pytest.approx(6 * gpt3.active_params_per_token() * D
                                                       + 12 * 96 * 2048 * 12288 * D)


def test_korthikanti_activation_memory():
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h
    assert 5 * a * s / h == 80
    assert korthikanti_no_parallelism(s, b, h, a) == sbh * (34 + 80) == 2_868_903_936
    assert korthikanti_tensor_parallel(s, b, h, a, t) == sbh * (10 + 24 / 8 + 80 / 8) == 578_813_952
    assert korthikanti_sequence_parallel(s, b, h, a, t) == sbh / 8 * 114 == 358_612_992
    # the general derivation reduces to the paper's closed forms for GPT-3's shapes
    gpt3 = resolve_model("gpt3-175b")
    assert activation_bytes_per_layer(gpt3, s, b) == pytest.approx(korthikanti_no_parallelism(s, b, h, a))
    assert activation_bytes_per_layer(gpt3, s, b, t) == pytest.approx(korthikanti_tensor_parallel(s, b, h, a, t))
    assert activation_bytes_per_layer(gpt3, s, b, t, True) == pytest.approx(korthikanti_sequence_parallel(s, b, h, a, t))
    # selective recomputation drops the 5 a s / h term; full keeps only the layer input
    assert activation_bytes_per_layer(gpt3, s, b, t, True, "selective") == pytest.approx(sbh * 34 / 8)
    assert activation_bytes_per_layer(gpt3, s, b, t, False, "selective") == pytest.approx(sbh * (10 + 24 / 8))
    assert activation_bytes_per_layer(gpt3, s, b, t, False, "full") == 2 * sbh
    assert activation_bytes_per_layer(gpt3, s, b, t, True, "full") == 2 * sbh / 8


# --- what the model predicts --------------------------------------------------------------------------


def test_decode_plateau_70b_h100_batch1():
    """TP=8 over TP=4 gains far less than the 2x of the weights alone: collectives and per-layer
    overheads do not shrink with TP. No special case: the same formulas as every other config."""
    arch = resolve_model("llama-2-70b")
    t = {tp: inference_times(arch, busiest_shard(arch, tp), BF16, H100, Placement(tp, 1, 8 // tp, 1, 8), 1, 512, 128)
         for tp in (4, 8)}
    weights = t[4].decode.breakdown.memory / t[8].decode.breakdown.memory
    speedup = t[4].tpot / t[8].tpot
    assert weights == pytest.approx(2.0, rel=0.02)
    assert speedup < 1.5
    fixed8 = t[8].decode.breakdown.comm + t[8].decode.breakdown.overhead
    assert fixed8 / t[8].tpot > 0.4
    r = plan(PlanRequest("llama-2-70b", "h100-sxm", 8))
    by = {(c.tp, c.pp): c for c in r.configs}
    assert by[(4, 1)].throughput_tok_s > by[(8, 1)].throughput_tok_s  # two TP=4 replicas beat one TP=8
    assert "two TP=4 replicas (DP=2)" in r.explanation


def test_expert_parallel_costs_latency_at_batch_1():
    mix = resolve_model("mixtral-8x7b")
    t = {ep: inference_times(mix, busiest_shard(mix, 8, ep), BF16, H100, Placement(8, 1, 1, ep, 8), 1, 128, 16).tpot
         for ep in (1, 8)}
    assert t[8] > t[1]  # one whole expert on the busiest rank against two 1/8 slices


def test_example_plan_is_sensible():
    r = plan(PlanRequest("llama-2-70b", "h100-sxm", 8, prompt_len=512, output_len=128, batch=1))
    by = {(c.tp, c.pp, c.dp): c for c in r.configs}
    assert not by[(1, 1, 8)].feasible and "does not fit" in by[(1, 1, 8)].reason
    assert all(c.feasible for c in r.configs if c.tp * c.pp >= 2)
    assert r.recommended.tp == 8 and r.objective == "latency"
    tpots = [by[(tp, 1, 8 // tp)].tpot_ms for tp in (2, 4, 8)]
    assert tpots == sorted(tpots, reverse=True)
    assert 5 < r.recommended.tpot_ms < 30 and 10 < r.recommended.ttft_ms < 100


def test_marginal_gain_prefers_smaller_replicas():
    def cfg(tp, dp, tpot, tput):
        return Config(tp, 1, dp, 1, ttft_ms=50.0, tpot_ms=tpot, throughput_tok_s=tput, usd_per_mtok=1.0)

    configs = [cfg(2, 4, 20.0, 180.0), cfg(4, 2, 10.5, 170.0), cfg(8, 1, 10.0, 95.0)]
    best, text = recommend(configs, "latency", "inference", False)
    assert (best.tp, best.dp) == (4, 2)
    assert "TP=8 would cut decode time by only 5%" in text and "run two TP=4 replicas (DP=2)" in text
    best, _ = recommend(configs, "throughput", "inference", False)
    assert best.tp == 2


def test_slo_filters_and_says_which_miss():
    r = plan(PlanRequest("llama-2-70b", "h100-sxm", 8, slo_tpot_ms=20))
    missed = [c for c in r.configs if c.feasible and c.slo_miss]
    assert missed and all(c.tpot_ms > 20 for c in missed)
    assert r.recommended.tpot_ms <= 20
    assert "miss the SLOs" in r.explanation


def test_tp_across_nodes_is_infeasible():
    r = plan(PlanRequest("llama-3-70b", "h100-sxm", 16))
    tp16 = next(c for c in r.configs if c.tp == 16)
    assert not tp16.feasible and "spans 2 nodes" in tp16.reason
    assert r.nodes == 2 and r.recommended.tp <= 8


def test_tensorpar_accepts_uneven_degrees_and_notes_other_engines():
    r = plan(PlanRequest("smollm2-135m", "l40s", 3))
    tp3 = next(c for c in r.configs if c.tp == 3)
    assert tp3.feasible and tp3.note is None  # 9 heads / 3
    r = plan(PlanRequest("llama-2-70b", "a100-80gb-sxm", 6, nodes=1))
    tp3 = next(c for c in r.configs if c.tp == 3 and c.pp == 1)
    assert tp3.feasible and "64 heads not divisible by 3" in tp3.note
    assert tp3.to_json()["reason"] == tp3.note


def test_training_plan():
    r = plan(PlanRequest("llama-3-8b", "h100-sxm", 8, mode="training", global_batch=64, seq_len=4096))
    best = r.recommended
    assert best.training.step > 0 and 0.2 < best.mfu < 0.7
    assert best.throughput_tok_s == pytest.approx(64 * 4096 / best.training.step)
    sharded = plan(PlanRequest("llama-3-8b", "h100-sxm", 8, mode="training", global_batch=64,
                               distributed_optimizer=True))
    dp8 = {(c.tp, c.pp): c for c in sharded.configs}[(1, 1)]
    plain = {(c.tp, c.pp): c for c in r.configs}[(1, 1)]
    assert dp8.memory.optimizer == pytest.approx(plain.memory.optimizer / 8)


def test_device_json(tmp_path):
    spec = {"peak_tflops": {"bf16": 100}, "memory_gib": 16, "memory_bandwidth_GBps": 500,
            "intra_node": {"bandwidth_GBps": 50, "latency_us": 10}, "gpus_per_node": 4, "price_per_hour": 1.0}
    path = tmp_path / "mygpu.json"
    path.write_text(json.dumps(spec))
    dev = resolve_device(str(path))
    assert dev.name == "mygpu" and dev.intra_node.latency_us == 10 and dev.inter_node is None
    r = plan(PlanRequest("llama-2-7b", str(path), 4))
    assert r.recommended is not None
    with pytest.raises(ValueError, match="unknown keys color"):
        device_from_dict({**spec, "color": "red"}, "x")
    with pytest.raises(ValueError, match="lacks memory_gib"):
        device_from_dict({k: v for k, v in spec.items() if k != "memory_gib"}, "x")


# --- nonsense input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    (dict(gpus=0), "--gpus must be at least 1"),
    (dict(gpu="h300"), "unknown device 'h300': choose one of h100-sxm"),
    (dict(model="llama-5"), "unknown model 'llama-5'"),
    (dict(model="llama-3.1-405b"), "llama-3.1-405b .* fits no configuration of 8 x h100-sxm .* needs"),
    (dict(gpus=12), "--gpus 12 does not fill whole nodes of 8"),
    (dict(gpus=8, nodes=3), "cannot be spread evenly over --nodes 3"),
    (dict(dtype="fp4"), r"unknown --dtype 'fp4'; choose one of: fp32 \(float32/f32\), bf16"),
    (dict(kv_dtype="float64"), "unknown --kv-dtype 'float64'"),
    (dict(batch=0), "--batch must be"),
    (dict(prompt_len=4000, output_len=200), "exceeds llama-2-70b's context of 4096"),
    (dict(slo_tpot_ms=-1.0), "--slo-tpot-ms must be a positive number"),
    (dict(objective="speed"), "--objective must be one of latency, throughput, cost"),
    (dict(calibrate="/nonexistent/bench.json"), "cannot read calibration file"),
])
def test_nonsense_input_says_what_is_wrong(kw, message):
    args = dict(model="llama-2-70b", gpu="h100-sxm", gpus=8)
    args.update(kw)
    with pytest.raises(PlanError, match=message):
        plan(PlanRequest(**args))


def test_moe_dispatch_is_the_engines_rule_and_the_all_to_all_is_costed():
    """The planner's MoE collectives follow ``partition.moe_dispatch``: an all-reduce of the partial
    sums unless each expert is whole on more than 2 k ranks and the step is long; then two
    all-to-alls of the (token, choice) rows and an all-gather of the slices."""
    from tensorpar.partition import moe_dispatch

    assert moe_dispatch(512, 2, 4) == "reduce"  # 2 k = 4 ranks: no fewer bytes
    assert moe_dispatch(512, 2, 8) == "all_to_all"
    assert moe_dispatch(8, 2, 8) == "reduce"  # latency-bound
    assert moe_dispatch(512, 2, 8, whole_experts=False) == "reduce"
    arch = resolve_model("mixtral-8x7b")
    p = BF16
    prefill, decode = prefill_step(1, 512), decode_step(1, 512)
    names = lambda shard, step: [c.name for c in layer_ops(arch, shard, step, p)[1]]  # noqa: E731
    assert names(busiest_shard(arch, 8, 8), prefill) == ["attention all-reduce", "experts all-to-all",
                                                         "experts all-to-all back", "experts all-gather"]
    assert names(busiest_shard(arch, 8, 8), decode) == ["attention all-reduce", "mlp all-reduce"]
    assert names(busiest_shard(arch, 8, 4), prefill) == ["attention all-reduce", "mlp all-reduce"]
    a2a = [c for c in layer_ops(arch, busiest_shard(arch, 8, 8), prefill, p)[1] if c.op == "all_to_all"]
    assert a2a[0].nbytes == 512 / 8 * 2 * arch.hidden * 2  # 64 tokens x top-2 rows of bf16


def test_the_plan_says_what_each_lost_gpu_costs():
    """Llama-3-70B on 4 x H100: losing one GPU re-plans on 3, then 2 (slower each time, the
    weights split fewer ways), and at 1 nothing fits, which ends the chain with the reason."""
    result = plan(PlanRequest(model="llama-3-70b", gpu="h100-sxm", gpus=4))
    chain = result.degrades_to
    assert [s["gpus"] for s in chain] == [3, 2, 1]
    assert [s["layout"] for s in chain[:2]] == ["TP=3", "TP=2"]
    assert 1 < chain[0]["tpot_x"] < chain[1]["tpot_x"]
    for step in chain[:2]:  # each step is the recommendation of a plan at that size
        alone = plan(PlanRequest(model="llama-3-70b", gpu="h100-sxm", gpus=step["gpus"])).recommended
        assert (step["tp"], step["pp"], step["dp"], step["tpot_ms"]) == (alone.tp, alone.pp, alone.dp,
                                                                       round(alone.tpot_ms, 3))
    assert chain[2]["layout"] is None and "fits no configuration of 1 x h100-sxm" in chain[2]["reason"]
    assert json.loads(render_json(result))["degrades_to"] == chain
    text = render_table(result)
    assert "If GPUs are lost, the best layout of those left: at 3, TP=3:" in text
    assert "at 1 nothing fits" in text


def test_one_gpu_has_nothing_to_lose():
    assert plan(PlanRequest(model="smollm2-135m", gpu="h100-sxm", gpus=1)).degrades_to == []


def test_speculative_decoding_divides_the_verify_and_draft_steps_by_the_tokens_kept():
    from tensorpar.planner.speculative import tokens_per_step

    assert tokens_per_step(4, 1.0) == 5 and tokens_per_step(4, 0.0) == 1 and tokens_per_step(2, 0.5) == 1.75
    base = PlanRequest(model="llama-3-70b", gpu="h100-sxm", gpus=8, speculative_tokens=4)

    def best(**kw):
        r = plan(PlanRequest(**{**base.__dict__, **kw}), degrade=False)
        return r, r.recommended.extra["speculative"]

    _, never = best(acceptance=0.0)  # n-gram drafts never taken: one token per (dearer) step
    assert never["tpot_ms"] == pytest.approx(never["verify_ms"], rel=1e-3) and never["tpot_ms"] > never["tpot_ms_without"]
    _, always = best(acceptance=1.0)
    assert always["tpot_ms"] == pytest.approx(always["verify_ms"] / 5, rel=1e-3) and always["draft_tp"] is None
    result, drafted = best(acceptance=0.8, draft="llama-3-8b")
    by_tp = drafted["draft_ms_by_tp"]
    assert drafted["draft_tp"] == int(min(by_tp, key=by_tp.get)) and len(by_tp) == result.recommended.tp
    assert drafted["tpot_ms"] == pytest.approx((drafted["verify_ms"] + 4 * drafted["draft_ms"])
                                               / tokens_per_step(4, 0.8), rel=1e-3)
    assert any(n.startswith("speculative decoding, 4 drafts per step") for n in result.notes)
    _, fixed = best(acceptance=0.8, draft="llama-3-8b", draft_tp=1)
    assert list(fixed["draft_ms_by_tp"]) == ["1"] and fixed["draft_tp"] == 1
    for kw, says in ((dict(acceptance=1.5), "--acceptance must be a probability"),
                     (dict(speculative_tokens=0, draft="llama-3-8b"), "--draft needs --speculative-tokens"),
                     (dict(draft_tp=2), "--draft-tp .* with --draft"), (dict(draft="no-such-model"), "--draft:")):
        with pytest.raises(PlanError, match=says):
            plan(PlanRequest(**{**base.__dict__, **kw}))
