"""Pure pieces of ``tensorpar bench``: sweep sizes, bus bandwidth factors, roofline arithmetic,
reading the peer's output, and the tables."""

from __future__ import annotations

import pytest

from tensorpar.bench.collectives_sweep import bus_factor, iterations_for, sweep_sizes
from tensorpar.bench.peers import parse_markers
from tensorpar.bench.report import table
from tensorpar.bench.roofline import roofline, weight_bytes
from tensorpar.models.config import ModelConfig


def test_sweep_sizes_go_by_four_up_to_the_limit():
    assert sweep_sizes(64 << 20) == [4 ** k for k in range(1, 14)]
    assert sweep_sizes(64 << 10)[-1] == 64 << 10
    assert sweep_sizes(100) == [4, 16, 64]


def test_fewer_iterations_for_large_messages():
    assert iterations_for(4, 50) == 50
    assert iterations_for(64 << 20, 50) == 4
    assert iterations_for(64 << 20, 2) == 2


def test_bus_factors_follow_nccl_tests():
    assert bus_factor("all_reduce", 2) == 1.0
    assert bus_factor("all_reduce", 4) == 1.5
    assert bus_factor("all_gather", 2) == 0.5
    assert bus_factor("all_gather", 3) == pytest.approx(2 / 3)


def _cfg(tied: bool) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=4, tie_word_embeddings=tied)


def test_weight_bytes_count_a_tied_embedding_once():
    per_layer = 8 * 8 * 2 + 8 * 4 * 2 + 3 * 8 * 16 + 2 * 8  # q, o; k, v; gate, up, down; two norms
    tied = 4 * (100 * 8 + 2 * per_layer + 8)
    assert weight_bytes(_cfg(True)) == tied
    assert weight_bytes(_cfg(False)) == tied + 4 * 100 * 8


def test_roofline_percentages():
    r = roofline(20_000_000, 20.0, cores=2, decode_b1_ms={1: 2.0, 2: 4.0, 3: None})
    assert r["roofline_ms_1core"] == pytest.approx(1.0)
    by = {p["tp"]: p for p in r["per_tp"]}
    assert by[1]["percent_of_roofline"] == pytest.approx(50.0)
    assert by[2]["roofline_ms"] == pytest.approx(0.5) and by[2]["percent_of_roofline"] == pytest.approx(12.5)
    assert by[3]["cores_used"] == 2 and by[3]["percent_of_roofline"] is None


def test_parse_markers_finds_results_and_errors_in_interleaved_output():
    text = ('noise\nTENSORPAR_BENCH_ERROR {"rank": 1, "reason": "boom"}TENSORPAR_BENCH_ERROR {"rank": 0, '
            '"reason": "bang"}\nmore noise\nTENSORPAR_BENCH_RESULT {"tp": 2, "x": [1, 2]}\n')
    result, errors = parse_markers(text)
    assert result == {"tp": 2, "x": [1, 2]}
    assert [e["rank"] for e in errors] == [1, 0]
    assert parse_markers("nothing here") == (None, [])


def test_table_aligns_columns_and_shows_missing_values():
    out = table(["a", "bb"], [[1, None], [123, "x"]], title="T")
    lines = out.splitlines()
    assert lines[0] == "T"
    assert lines[1] == "  a | bb"
    assert lines[3] == "  1 |  -"
    assert lines[4] == "123 |  x"


def test_weight_bytes_of_a_mixture_of_experts_count_the_chosen_experts_only():
    from helpers import TINY_CONFIGS


    cfg = ModelConfig.from_hf(TINY_CONFIGS["mixtral"])  # 8 experts, top-2, 2 layers
    dense = ModelConfig.from_hf({**TINY_CONFIGS["mixtral"], "num_local_experts": 2})
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    assert weight_bytes(cfg) == weight_bytes(dense) + 2 * cfg.hidden_size * 6 * 4  # 2 layers: the router's 6 more rows
    assert weight_bytes(dense) > 2 * 2 * expert


def test_llama_cpp_rows_sit_beside_tensorpar_at_the_matching_quantization():
    from tensorpar.bench.report import llama_cpp_table

    result = {"tensorpar": [
        {"status": "ok", "tp": 1, "quantization": "gguf", "decode_ms_per_token": {"1": 30.0}},
        {"status": "ok", "tp": 2, "quantization": "gguf", "decode_ms_per_token": {"1": 20.0}},
        {"status": "ok", "tp": 2, "decode_ms_per_token": {"1": 50.0}},  # no "quantization": float32
        {"status": "ok", "tp": 1, "quantization": "int4 g32", "decode_ms_per_token": {"1": 12.0}},
    ], "peers": {"llama_cpp": [
        {"status": "ok", "type": "Q4_0", "threads": 2, "decode_ms_per_token": {"1": 8.0}, "prefill_tokens_per_s": 1},
        {"status": "ok", "type": "native", "threads": 2, "decode_ms_per_token": {"1": 10.0}, "prefill_tokens_per_s": 300},
        {"status": "ok", "type": "F32", "threads": 2, "decode_ms_per_token": {"1": 25.0}, "prefill_tokens_per_s": 500},
        {"status": "failed", "type": "Q8_0", "threads": 1, "reason": "boom"},
    ]}}
    lines = llama_cpp_table(result).splitlines()
    assert "TP=1" in lines[1] and "TP=2" in lines[1]
    int4, native, f32, failed = lines[3:7]
    assert "12.00 (1.50x)" in int4
    assert "gguf" in native and "30.00 (3.00x)" in native and "20.00 (2.00x)" in native
    assert "none" in f32 and "50.00 (2.00x)" in f32
    assert failed.rstrip().endswith("FAILED: boom")
    assert llama_cpp_table({"tensorpar": [], "peers": {}}) == ""


def test_llama_cpp_peer_skips_a_model_that_is_not_gguf(tiny_checkpoints):
    from tensorpar.bench.peers import llama_cpp

    (row,) = llama_cpp(str(tiny_checkpoints["llama"]), ["none"], [1], 4, 16, vocab=250)
    assert row["status"] == "skipped" and "is not a GGUF file" in row["reason"]
