"""``--calibrate``: fitting the device model to a ``tensorpar bench`` result of this machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tensorpar.planner import PlanRequest, plan
from tensorpar.planner.calibrate import calibrate, fit_collective
from tensorpar.planner.hardware import BUILTIN_DEVICES

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "2026-11-25-cpu" / "bench.json"


def test_fit_collective_recovers_alpha_and_bandwidth():
    alpha, busbw, n = 5e-6, 2e9, 2
    pts = [(s, alpha + s * 2 * (n - 1) / n / busbw) for s in (4, 1024, 65536, 1 << 20, 1 << 24)]
    a, b = fit_collective(pts, 2 * (n - 1) / n)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(busbw, rel=1e-6)


@pytest.fixture(scope="module")
def calibrated():
    return calibrate(BUILTIN_DEVICES["cpu"], str(BENCH))


def test_calibration_reads_the_machine_and_collectives(calibrated):
    device, report = calibrated
    data = json.loads(BENCH.read_text())
    assert device.cores == data["machine"]["cores"] == 2
    assert device.memory_bandwidth_GBps == pytest.approx(data["roofline"]["bandwidth_1_thread"]["read_GBps"])
    assert report.backend == "shm"
    reduce2 = next(m for m in report.collectives if m.op == "all_reduce" and m.world_size == 2)
    assert 2 < reduce2.alpha_us < 6 and 1.5 < reduce2.busbw_GBps < 3  # the sweep: ~4 us, ~2.1 GB/s
    assert device.oversubscribed_latency_us > 10  # 3 ranks on 2 cores wait for a descheduled rank
    assert set(report.params) == {"memory_efficiency", "matmul_efficiency", "gemm_half_rows", "layer_overhead_us"}


def test_smollm2_tp123_within_25_percent_of_measured(calibrated):
    """Decode ms/token (batch 1 and 8) and 512-token prefill at TP=1,2,3, from one fit of four
    parameters over all nine rows: every prediction within 25% of bench.json."""
    _, report = calibrated
    got = {(r.kind, r.tp, r.batch): r for r in report.rows}
    measured = {("decode", 1, 1): 37.2, ("decode", 2, 1): 27.2, ("decode", 3, 1): 47.9,
                ("prefill", 1, 1): 830.5, ("prefill", 2, 1): 823.4, ("prefill", 3, 1): 1093.5}
    for key, ms in measured.items():
        assert got[key].measured_ms == pytest.approx(ms, abs=0.1)
        assert abs(got[key].error) < 0.25, (key, got[key].predicted_ms, ms)
    assert all(abs(r.error) < 0.25 for r in report.rows)
    # the oversubscribed TP=3 comes out slowest at decode, from machine.cores, not a special case
    assert got[("decode", 3, 1)].predicted_ms > got[("decode", 1, 1)].predicted_ms > got[("decode", 2, 1)].predicted_ms


def test_plan_with_calibration_recommends_tp2_on_two_cores():
    r = plan(PlanRequest("smollm2-135m", "cpu", 2, prompt_len=16, output_len=32, dtype="fp32",
                         calibrate=str(BENCH)))
    assert r.calibration is not None
    tp = {c.tp: c for c in r.configs}
    assert tp[2].tpot_ms < tp[1].tpot_ms
    r3 = plan(PlanRequest("smollm2-135m", "cpu", 3, prompt_len=16, output_len=32, dtype="fp32", calibrate=str(BENCH)))
    tp3 = next(c for c in r3.configs if c.tp == 3)
    assert tp3.tpot_ms > tp[2].tpot_ms


def test_not_a_bench_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a tensorpar bench result"):
        calibrate(BUILTIN_DEVICES["cpu"], str(path))
