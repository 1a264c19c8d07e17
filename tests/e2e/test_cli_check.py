"""``tensorpar check`` driven as a user would: a layout against one rank, float and quantized."""

from __future__ import annotations

import json

import pytest
from helpers import cli


@pytest.mark.timeout(200)
def test_check_passes_a_tp4_layout_with_padded_heads_and_its_int8_weights(tiny_chat_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\ndef add(a, b):\n")
    r = cli("check", "--model", str(tiny_chat_checkpoint), "--tp", "4", "--prompts", str(prompts),
            "--max-new-tokens", "6", "--json")  # 6 query heads over 4 ranks: padded slots, KV heads replicated
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["passed"] and out["layout"] == "tp=4" and out["tolerance"] == 1e-4
    assert out["replicated_values"] == "bit-identical"
    assert [p["prompt"] for p in out["prompts"]] == ["The capital of France is", "def add(a, b):"]
    for p in out["prompts"]:
        assert p["verdict"] in ("ok", "near-tie") and p["max_rel_error"] < 1e-4 and p["tokens"] > 6
    r = cli("check", "--model", str(tiny_chat_checkpoint), "--tp", "2", "--quantization", "int8",
            "--prompts", str(prompts), "--max-new-tokens", "6")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "int8 weights" in r.stdout and r.stdout.rstrip().endswith("passed")
    assert "max rel err" in r.stdout


def test_check_refuses_an_empty_prompts_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    r = cli("check", "--prompts", str(empty), timeout=60)
    assert r.returncode == 1 and "holds no prompt" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.timeout(200)
def test_check_names_the_layer_where_a_rank_missed_its_all_reduce(tiny_chat_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n")
    r = cli("check", "--model", str(tiny_chat_checkpoint), "--tp", "2", "--prompts", str(prompts),
            "--max-new-tokens", "4", "--json", "--fault", "drop-all-reduce:1")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert not out["passed"] and out["prompts"][0]["verdict"] == "MISMATCH"
    assert out["replicated_values"] == "model.layers.1 output (the residual stream) differs between rank 0 and rank 1"


@pytest.mark.timeout(200)
def test_check_names_the_kv_head_a_rank_swapped(tiny_chat_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n")
    # 6 query heads over 4 ranks: rank 1 holds KV heads 0 and 1 (and swaps them), rank 0 holds KV head 0
    r = cli("check", "--model", str(tiny_chat_checkpoint), "--tp", "4", "--prompts", str(prompts),
            "--max-new-tokens", "4", "--fault", "swap-kv-heads:1")
    assert r.returncode == 1, r.stderr
    assert ("replicated values across each tensor-parallel group: model.layers.1.self_attn key of KV head 0 "
            "differs between rank 0 and rank 1") in r.stdout
    assert "MISMATCH" in r.stdout and r.stdout.rstrip().endswith("FAILED: a real mismatch (see above)")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_check_passes_smollm2_at_tp3(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n")
    r = cli("check", "--tp", "3", "--prompts", str(prompts), "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["passed"] and out["replicated_values"] == "bit-identical" and out["layout"] == "tp=3"
    assert out["prompts"][0]["max_rel_error"] < 1e-4


@pytest.mark.timeout(200)
def test_check_deterministic_at_tp3_reports_every_prompt_bit_identical(tiny_chat_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\ndef add(a, b):\n")
    r = cli("check", "--model", str(tiny_chat_checkpoint), "--tp", "3", "--deterministic", "--prompts", str(prompts),
            "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["passed"] and out["layout"] == "tp=3"
    assert [(p["verdict"], p["max_rel_error"]) for p in out["prompts"]] == [("bit-identical", 0.0)] * 2
