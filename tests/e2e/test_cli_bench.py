"""``tensorpar bench`` driven as a user would, kept small with ``--quick`` on a tiny Llama that has
SmolLM2's tokenizer (6 query heads, 2 KV heads)."""

from __future__ import annotations

import json
import math

import pytest
from helpers import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_pngs(out):
    for name in ("latency_vs_tp.png", "collectives.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name


@pytest.mark.timeout(240)
def test_bench_quick_tp1_tp2_without_peers(tiny_chat_checkpoint, tmp_path):
    out = tmp_path / "bench"
    r = cli("bench", "--quick", "--tp", "1,2", "--model", str(tiny_chat_checkpoint), "--out", str(out),
            "--no-peers", timeout=230)
    assert r.returncode == 0, r.stderr
    assert "decode ms/tok" in r.stdout and "all-reduce, 2 ranks" in r.stdout and "roofline" in r.stdout
    res = json.loads((out / "bench.json").read_text())

    assert res["command"].startswith("tensorpar bench --quick --tp 1,2")
    assert res["machine"]["cores"] >= 1 and res["machine"]["torch"] and res["date"]
    assert res["settings"]["new_tokens"] == 4 and res["settings"]["prompt_len"] == 64
    assert res["peers"] is None

    rows = {row["tp"]: row for row in res["tensorpar"]}
    assert set(rows) == {1, 2}
    for tp, row in rows.items():
        assert row["status"] == "ok", row
        assert _positive(row["decode_ms_per_token"]["1"]) and _positive(row["decode_ms_per_token"]["8"])
        assert _positive(row["prefill_tokens_per_s"])
        assert len(row["peak_rss_mb"]) == tp and all(m > 50 for m in row["peak_rss_mb"])

    # Roofline: the tiny model's float32 weights (untied: embedding and LM head) over a measured bandwidth.
    roof = res["roofline"]
    hidden, inter, layers, vocab, heads, kv, hd = 48, 88, 2, 49152, 6, 2, 8
    per_layer = hidden * (heads * hd) * 2 + hidden * (kv * hd) * 2 + 3 * hidden * inter + 2 * hidden
    assert roof["weight_bytes"] == 4 * (2 * vocab * hidden + layers * per_layer + hidden)
    assert _positive(roof["bandwidth_1_thread"]["read_GBps"]) and _positive(roof["bandwidth_1_thread"]["copy_GBps"])
    assert _positive(roof["roofline_ms_1core"])
    per_tp = {p["tp"]: p for p in roof["per_tp"]}
    assert per_tp[1]["roofline_ms"] == pytest.approx(roof["roofline_ms_1core"])
    for tp, p in per_tp.items():
        assert p["percent_of_roofline"] == pytest.approx(p["roofline_ms"] / rows[tp]["decode_ms_per_token"]["1"] * 100)

    # Collective sweep on 2 ranks: 4 B .. 64 KB by 4x, all-reduce and all-gather, gloo at least.
    coll = res["collectives"]
    gloo_ar = sorted(c["bytes"] for c in coll if c["backend"] == "gloo" and c["collective"] == "all_reduce")
    assert gloo_ar == [4 ** k for k in range(1, 9)]
    assert {c["collective"] for c in coll} == {"all_reduce", "all_gather"}
    for c in coll:
        assert c["world_size"] == 2 and c["correct"], c
        assert _positive(c["latency_us"]) and _positive(c["algbw_GBps"])
        factor = 1.0 if c["collective"] == "all_reduce" else 0.5  # 2(n-1)/n and (n-1)/n at n = 2
        assert c["busbw_GBps"] == pytest.approx(c["algbw_GBps"] * factor)
        assert c["algbw_GBps"] == pytest.approx(c["bytes"] / (c["latency_us"] * 1e-6) / 1e9)
    _check_pngs(out)


@pytest.mark.timeout(240)
def test_bench_records_transformers_tp_plan_failure_as_a_result(tiny_chat_checkpoint, tmp_path):
    # 2 KV heads do not split over 3 ranks for transformers' tp_plan="auto"; tensorpar runs TP=3.
    out = tmp_path / "bench"
    # tensorpar's row with n-gram speculative decoding: its acceptance in the row and the table
    r = cli("bench", "--quick", "--tp", "3", "--model", str(tiny_chat_checkpoint), "--out", str(out),
            "--no-sweep", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, '
            '"prompt_lookup_min": 1, "prompt_lookup_max": 2}', timeout=230)
    assert r.returncode == 0, r.stderr
    assert "FAILED" in r.stdout and "3, ngram k=2 n=1..2 (accepted b=1 " in r.stdout
    res = json.loads((out / "bench.json").read_text())
    (row,) = res["tensorpar"]
    assert row["tp"] == 3 and row["status"] == "ok" and len(row["peak_rss_mb"]) == 3
    assert row["speculative"] == "ngram k=2 n=1..2" and set(row["speculation"]) == {"1", "8"}
    assert all(0 <= s["acceptance_rate"] <= 1 for s in row["speculation"].values())

    single = res["peers"]["transformers"]
    assert single["status"] == "ok", single
    assert _positive(single["decode_ms_per_token"]["1"]) and _positive(single["decode_ms_per_token"]["8"])
    assert _positive(single["prefill_tokens_per_s"]) and single["peak_rss_mb"][0] > 50

    (tp_plan,) = res["peers"]["transformers_tp_plan"]
    assert tp_plan["tp"] == 3 and tp_plan["status"] == "failed"
    reason = tp_plan["reason"]
    assert reason and "\n" not in reason and len(reason) <= 300 and "timed out" not in reason
    (llama,) = res["peers"]["llama_cpp"]  # llama.cpp runs GGUF files only
    assert llama["status"] == "skipped" and "not a GGUF file" in llama["reason"]
    assert res["collectives"] is None
    _check_pngs(out)


@pytest.mark.timeout(240)
def test_bench_pipeline_stages(tiny_chat_checkpoint, tmp_path):
    """``--pp 2``: each TP degree runs over two stages (2 layers: one each); no roofline, which is per
    TP. In deterministic mode (``--deterministic``), which the rows and the table say."""
    out = tmp_path / "bench-pp"
    r = cli("bench", "--quick", "--tp", "1,2", "--pp", "2", "--model", str(tiny_chat_checkpoint), "--out", str(out),
            "--no-peers", "--no-sweep", "--deterministic", timeout=230)
    assert r.returncode == 0, r.stderr
    assert "1 x pp 2, deterministic" in r.stdout and "2 x pp 2, deterministic" in r.stdout
    assert "roofline: not measured" in r.stdout
    res = json.loads((out / "bench.json").read_text())
    rows = {(row["tp"], row["pp"]): row for row in res["tensorpar"]}
    assert set(rows) == {(1, 2), (2, 2)} and res["settings"]["pp"] == 2
    for (tp, pp), row in rows.items():
        assert row["status"] == "ok" and len(row["peak_rss_mb"]) == tp * pp and row["deterministic"]
        assert all(_positive(v) for v in row["decode_ms_per_token"].values())


@pytest.mark.timeout(240)
def test_bench_serving_replicas(tiny_chat_checkpoint, tmp_path):
    """``--dp 2``: two serving replicas of TP=1 take the batch's requests between them."""
    out = tmp_path / "bench-dp"
    r = cli("bench", "--quick", "--tp", "1", "--dp", "2", "--batch", "1,4", "--model", str(tiny_chat_checkpoint),
            "--out", str(out), "--no-peers", "--no-sweep", timeout=230)
    assert r.returncode == 0, r.stderr
    assert "1 x dp 2" in r.stdout and "roofline: not measured" in r.stdout
    res = json.loads((out / "bench.json").read_text())
    (row,) = res["tensorpar"]
    assert row["status"] == "ok" and (row["tp"], row["pp"], row["dp"]) == (1, 1, 2) and res["settings"]["dp"] == 2
    assert set(row["decode_ms_per_token"]) == {"1", "4"} and all(_positive(v) for v in row["decode_ms_per_token"].values())
    assert row["decode_tokens_per_s"]["4"] == pytest.approx(4e3 / row["decode_ms_per_token"]["4"])
    assert _positive(row["prefill_tokens_per_s"])


@pytest.mark.timeout(240)
def test_bench_expert_dispatch_both_ways_with_its_load(tiny_moe_chat_checkpoint, tmp_path):
    """``--ep 2 --moe-dispatch reduce,all_to_all``: one row per dispatch, each with the tokens each
    expert got per layer and phase (the same routing both ways), tabled and drawn."""
    out = tmp_path / "bench-moe"
    r = cli("bench", "--quick", "--tp", "2", "--ep", "2", "--moe-dispatch", "reduce,all_to_all",
            "--model", str(tiny_moe_chat_checkpoint), "--out", str(out), "--no-peers", "--no-sweep", timeout=230)
    assert r.returncode == 0, r.stderr
    assert "2, ep 2, reduce" in r.stdout and "2, ep 2, all_to_all" in r.stdout and "expert-set imbalance" in r.stdout
    res = json.loads((out / "bench.json").read_text())
    rows = {row["moe_dispatch"]: row for row in res["tensorpar"]}
    assert set(rows) == {"reduce", "all_to_all"} and all(row["status"] == "ok" for row in rows.values())
    assert rows["reduce"]["experts"] == rows["all_to_all"]["experts"]
    prefill = rows["reduce"]["experts"]["prefill"]
    assert set(prefill["tokens"]) == {"0", "1"}  # both layers are sparse
    assert all(sum(counts) == 64 * 2 and len(counts) == 6 for counts in prefill["tokens"].values())  # 64 tokens, top-2
    assert all(1.0 <= x <= 2.0 for x in prefill["imbalance"].values())
    data = (out / "experts.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
