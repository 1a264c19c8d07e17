"""Faults injected into `tensorpar generate` and `serve`: a rank killed or stopped mid-decode, a
port already taken, a truncated checkpoint. Each ends in one line naming the cause, within a
bound, with no rank process or shared-memory segment left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli, rank_processes


@pytest.fixture
def record(request):
    """``record(fault=, command=, layout=, sees=, seconds=, lost=)``: this case's row, appended to
    ``$TENSORPAR_FAULT_RESULTS`` (JSON lines) when it is set, for ``tests/faults/report.py``."""

    def write(**row):
        path = os.environ.get("TENSORPAR_FAULT_RESULTS")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"case": request.node.name, **row}) + "\n")

    return write


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("tensorpar: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def _generating(model: Path, tp: int, timeout_s: float | None = None) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("tensorpar")
    args = [str(exe), "generate", "--model", str(model), "--tp", str(tp), "--ignore-eos", "--max-new-tokens", "8000",
            "--prompt", "Once upon a time"] + (["--timeout", str(timeout_s)] if timeout_s else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "generating" in line:
            time.sleep(0.5)
            return proc
        if not line and proc.poll() is not None:
            pytest.fail(f"generate ended before generating: {proc.stderr.read()}")
    proc.kill()
    pytest.fail("generation did not start")


def _ranks_of(proc: subprocess.Popen) -> dict:
    return {p.info["name"]: p for p in rank_processes() if p.ppid() == proc.pid}


def _nothing_left(ranks: dict, segments_before: set) -> None:
    time.sleep(0.5)
    alive = [p for p in ranks.values() if p.is_running() and p.status() != "zombie"]
    assert not alive, alive
    assert set(Path("/dev/shm").glob("tensorpar-*")) <= segments_before


def _inject(proc: subprocess.Popen, name: str, sig: int) -> tuple[str, float, dict]:
    """Send ``sig`` to rank process ``name`` of ``proc``: (stderr, seconds until ``proc`` ended, its ranks)."""
    try:
        ranks = _ranks_of(proc)
        t = time.monotonic()
        os.kill(ranks[name].pid, sig)
        _, err = proc.communicate(timeout=60)
        return err, time.monotonic() - t, ranks
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("tp, victim", [(2, 1), (2, 0), (3, 2)])
def test_sigkill_of_a_rank_mid_decode(tp, victim, tiny_chat_checkpoint, record):
    segments = set(Path("/dev/shm").glob("tensorpar-*"))
    err, seconds, ranks = _inject(_generating(tiny_chat_checkpoint, tp), f"tensorpar-r{victim}", signal.SIGKILL)
    line = _error_line(err)
    assert f"rank {victim} of {tp} failed: killed by signal SIGKILL" in line
    assert set(ranks) == {f"tensorpar-r{r}" for r in range(tp)} and seconds < 30
    _nothing_left(ranks, segments)
    record(fault=f"SIGKILL of rank {victim} while decoding", command="generate", layout=f"tp={tp}", sees=line,
           seconds=round(seconds, 1), lost="the generation in progress (nothing was saved)")


@pytest.mark.timeout(150)
def test_sigstop_of_a_rank_mid_decode_is_a_timeout_naming_it(tiny_chat_checkpoint, record):
    segments = set(Path("/dev/shm").glob("tensorpar-*"))
    err, seconds, ranks = _inject(_generating(tiny_chat_checkpoint, 2, timeout_s=5), "tensorpar-r1", signal.SIGSTOP)
    line = _error_line(err)
    assert "rank 1 of 2 failed: did not answer within 5 s" in line
    assert seconds < 15  # the timeout, then a forced stop of the group (a stopped rank ignores SIGTERM)
    _nothing_left(ranks, segments)
    record(fault="SIGSTOP of rank 1 while decoding (--timeout 5)", command="generate", layout="tp=2", sees=line,
           seconds=round(seconds, 1), lost="the generation in progress")


@pytest.mark.timeout(120)
def test_a_port_already_in_use_is_named(tiny_chat_checkpoint, record):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t = time.monotonic()
        r = cli("serve", "--model", str(tiny_chat_checkpoint), "--port", str(port), timeout=100)
        seconds = time.monotonic() - t
    line = _error_line(r.stderr)
    assert r.returncode != 0 and line == f"tensorpar: error: could not listen on http://127.0.0.1:{port}: address already in use"
    assert "loading weights" not in r.stderr and "ERROR" not in r.stderr  # refused before the model loads
    record(fault="the HTTP port is taken", command="serve", layout="tp=1", sees=line, seconds=round(seconds, 1),
           lost="nothing (the server never started)")


@pytest.mark.timeout(120)
def test_a_truncated_checkpoint_is_named_before_any_rank_holds_weights(tiny_chat_checkpoint, tmp_path, record):
    broken = tmp_path / "truncated"
    shutil.copytree(tiny_chat_checkpoint, broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    t = time.monotonic()
    r = cli("generate", "--model", str(broken), "--tp", "2", "--prompt", "hi", "--max-new-tokens", "2", timeout=100)
    seconds = time.monotonic() - t
    line = _error_line(r.stderr)
    assert r.returncode != 0 and str(weights) in line and "truncated" in line
    assert "loading weights" not in r.stderr  # refused while opening the file, before any rank loads
    record(fault="safetensors file truncated to half", command="generate", layout="tp=2", sees=line,
           seconds=round(seconds, 1), lost="nothing")
