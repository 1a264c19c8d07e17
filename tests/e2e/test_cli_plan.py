"""``tensorpar plan`` as a user runs it: the table, the JSON schema, the plot, one-line errors,
and no torch on the way."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import cli

EXAMPLE = ["plan", "--model", "llama-2-70b", "--gpu", "h100-sxm", "--gpus", "8", "--prompt-len", "512",
           "--output-len", "128", "--batch", "1"]
CONFIG_KEYS = {"tp", "pp", "dp", "ep", "feasible", "reason", "memory_gib_per_gpu", "ttft_ms", "tpot_ms",
               "throughput_tok_s", "usd_per_mtok", "runnable_by_tensorpar", "tensorpar_flags"}
MEMORY_KEYS = {"weights", "kv_cache", "activations", "total"}


def test_table():
    r = cli(*EXAMPLE, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "llama-2-70b (69.0B parameters" in out and "8 x h100-sxm" in out
    assert "TTFT ms" in out and "TPOT ms" in out and "KV capacity tok" in out and "$/Mtok" in out
    rec = [line for line in out.splitlines() if line.startswith("* |")]
    assert len(rec) == 1 and "TP=8" in rec[0]
    assert "does not fit" in out  # TP=1 DP=8
    assert "Recommended TP=8" in out and "two TP=4 replicas (DP=2)" in out


def test_engine_profiles():
    """The same hardware predicted for the engine the user runs: the fixed costs differ."""
    tpot = {}
    for engine in ("tensorpar", "vllm", "trtllm", "gpt-fast"):
        r = cli(*EXAMPLE, "--engine", engine, "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        tpot[engine] = [c["tpot_ms"] for c in data["configs"] if c["tp"] == 8][0]
    assert len(set(tpot.values())) == 4
    r = cli(*EXAMPLE, "--engine", "trtllm", timeout=60)
    assert "engine: trtllm" in r.stdout


def test_json_schema():
    r = cli(*EXAMPLE, "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) == {"configs", "recommended", "explanation", "degrades_to"}
    assert [s["gpus"] for s in data["degrades_to"]] == [7, 6, 5]
    assert len(data["configs"]) == 10  # every (TP, PP, DP) of 8 GPUs
    for c in data["configs"]:
        assert set(c) == CONFIG_KEYS
        assert set(c["memory_gib_per_gpu"]) == MEMORY_KEYS
        assert c["tp"] * c["pp"] * c["dp"] == 8
        if c["feasible"]:
            assert c["tpot_ms"] > 0 and c["ttft_ms"] > 0 and c["throughput_tok_s"] > 0 and c["usd_per_mtok"] > 0
        else:
            assert c["reason"]
    assert set(data["recommended"]) == CONFIG_KEYS
    assert (data["recommended"]["tp"], data["recommended"]["pp"], data["recommended"]["dp"]) == (8, 1, 1)
    assert "TP=4" in data["explanation"]


def test_plot(tmp_path):
    png = tmp_path / "plan.png"
    r = cli(*EXAMPLE, "--plot", str(png), timeout=120)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--gpus", "0"], "--gpus must be at least 1"),
    (["--gpu", "h300"], "unknown device 'h300'"),
    (["--model", "llama-3.1-405b"], "fits no configuration of 8 x h100-sxm"),
    (["--calibrate", "/nonexistent.json"], "cannot read calibration file"),
    (["--engine", "nope"], "unknown engine 'nope'"),
])
def test_errors_are_one_line(args, message):
    base = {"--model": "llama-2-70b", "--gpu": "h100-sxm", "--gpus": "8"}
    base.update(dict(zip(args[::2], args[1::2])))
    r = cli("plan", *[x for kv in base.items() for x in kv], timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tensorpar: error: ") and message in lines[0]
    assert r.stdout == ""


def test_training_and_calibrated_cpu_plans():
    r = cli("plan", "--model", "llama-3-8b", "--gpu", "h100-sxm", "--gpus", "8", "--mode", "training",
            "--global-batch", "64", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)["recommended"]
    assert rec["step_s"] > 0 and 0 < rec["mfu"] < 1
    r = cli("plan", "--model", "smollm2-135m", "--gpu", "cpu", "--gpus", "2", "--dtype", "fp32",
            "--calibrate", "benchmarks/results/2026-11-25-cpu/bench.json", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "calibrated from benchmarks/results/2026-11-25-cpu/bench.json" in r.stdout


def test_plan_imports_no_torch():
    code = ("import sys, io, contextlib\n"
            "from tensorpar.cli.main import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try:\n"
            f"        main({EXAMPLE!r})\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\n"
            "assert 'Recommended' in buf.getvalue()\n"
            "bad = [m for m in ('torch', 'matplotlib', 'numpy') if m in sys.modules]\n"
            "print('loaded:', bad)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "loaded: []"


def test_json_marks_what_tensorpar_runs_and_serve_takes_the_recommendation(tmp_path):
    """TP x PP x DP of a dense model is runnable (DP through serve's replicas), and a mixture of
    experts with EP dividing TP."""
    import argparse

    from tensorpar.cli.serve import apply_plan_file
    from tensorpar.errors import TensorparError

    r = cli("plan", "--model", "smollm2-135m", "--gpu", "cpu", "--gpus", "2", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    flags = {(c["tp"], c["pp"], c["dp"]): (c["runnable_by_tensorpar"], c["tensorpar_flags"]) for c in plan["configs"]}
    assert flags == {(1, 1, 2): (True, "--tp 1 --pp 1 --dp 2"), (1, 2, 1): (True, "--tp 1 --pp 2"),
                     (2, 1, 1): (True, "--tp 2 --pp 1")}
    path = tmp_path / "plan.json"
    path.write_text(r.stdout)
    args = argparse.Namespace(plan=str(path), tp=None, pp=1, dp=1)
    apply_plan_file(args)
    best = plan["recommended"]
    assert (args.tp, args.pp, args.dp) == (best["tp"], best["pp"], best["dp"])
    plan["recommended"] = {**next(c for c in plan["configs"] if c["dp"] == 2), "ep": 2, "runnable_by_tensorpar": False}
    path.write_text(json.dumps(plan))
    with pytest.raises(TensorparError, match="cannot run the recommended TP=1 PP=1 DP=2 EP=2 yet"):
        apply_plan_file(args)
    moe = cli("plan", "--model", "mixtral-8x7b", "--gpu", "h100-sxm", "--gpus", "8", "--json")
    configs = json.loads(moe.stdout)["configs"]
    ep = [c for c in configs if c["ep"] > 1]
    assert ep and all(c["runnable_by_tensorpar"] == (c["tp"] % c["ep"] == 0) for c in ep)
    assert all(f"--ep {c['ep']}" in c["tensorpar_flags"] for c in ep if c["runnable_by_tensorpar"])
    bad = cli("serve", "--plan", str(tmp_path / "missing.json"))
    assert bad.returncode == 1 and "not the output of `tensorpar plan --json`" in bad.stderr
