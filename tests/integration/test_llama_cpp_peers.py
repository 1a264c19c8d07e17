"""The current llama.cpp build's own tools, really run: ``llama-bench`` as ``tensorpar bench``'s
peer, and ``llama-server`` through ``benchmarks/serving.py``, on a float32 SmolLM2 GGUF file.

Needs the binaries ``make peers`` builds (found as bench finds them: ``$TENSORPAR_LLAMA_CPP``, else
``.peers/llama.cpp/bin``) and the file (``$TENSORPAR_PEERS_GGUF``, default
``/work/peers/models/smollm2-f32.gguf``); skipped without either (CI has neither). Kept short:
4 new tokens, one repetition, two requests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tensorpar.bench import llama_bin

ROOT = Path(__file__).resolve().parents[2]
GGUF = Path(os.environ.get("TENSORPAR_PEERS_GGUF", "/work/peers/models/smollm2-f32.gguf"))


def _needs(tool: str) -> Path:
    bin_dir = llama_bin.find_bin_dir(tool)
    if bin_dir is None:
        pytest.skip(llama_bin.absent_message(tool))
    if not GGUF.is_file():
        pytest.skip(f"no {GGUF} (set TENSORPAR_PEERS_GGUF to a float32 GGUF file)")
    return bin_dir


def _threads() -> int:
    return min(2, len(os.sched_getaffinity(0)))


@pytest.mark.timeout(180)
def test_llama_bench_peer_on_a_float32_file():
    from tensorpar.bench.peers import llama_cpp_current

    _needs("llama-bench")
    (row,) = llama_cpp_current(str(GGUF), ["none"], _threads(), new_tokens=4, prompt_len=16, repeats=1,
                               timeout_s=150)  # the file is F32: its own row is the F32 one, nothing converted
    assert row["status"] == "ok", row
    assert (row["peer"], row["type"], row["file_type"], row["threads"]) == (
        "llama.cpp (current build)", "native", "F32", _threads())
    assert 0.5 < row["decode_ms_per_token"]["1"] < 5000 and 1 < row["prefill_tokens_per_s"] < 1e6
    assert row["decode_ms_per_token"]["1"] == pytest.approx(row["decode_ms_per_token_mean"]["1"], rel=1e-4)  # 1 run
    assert row["prefill_s"] == pytest.approx(16 / row["prefill_tokens_per_s"])
    assert re.fullmatch(r"[0-9a-f]{7,} \(build \d+\)", row["build"]), row["build"]
    assert row["command"][1:] == ["-m", str(GGUF), "-p", "16", "-n", "4", "-t", str(_threads()), "-r", "1", "-o",
                                  "json"]


def _llama_servers(port: int) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if p.info["status"] != psutil.STATUS_ZOMBIE and cmd and cmd[0].endswith("llama-server") and str(port) in cmd:
            found.append(p)
    return found


def _serving(out: Path, *more: str) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--tp", "", "--llama-server", str(GGUF),
            "--llama-threads", str(_threads()), "--llama-parallel", "2", "--out", str(out), *more]


@pytest.mark.timeout(180)
def test_serving_py_measures_llama_server_and_stops_it(tmp_path):
    _needs("llama-server")
    out = tmp_path / "serving"
    r = subprocess.run(_serving(out, "--concurrency", "2", "--requests", "2", "--max-tokens", "4"),
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"llama-server F32 t={_threads()} np=2 concurrency=  2:" in r.stdout
    res = json.loads((out / "serving.json").read_text())
    (row,) = res["rows"]
    assert row["server"] == "llama-server" and row["variant"] == "llama-server" and row["concurrency"] == 2
    assert row["llama_type"] == "F32" and row["gguf"] == str(GGUF) and row["threads"] == _threads()
    assert row["requests"] == 2 and row["output_tokens"] == 2 * 4  # ignore_eos and max_tokens honoured
    assert row["output_tokens_per_s"] == pytest.approx(8 / row["wall_s"])
    assert 0 < row["ttft_ms"]["p50"] <= row["ttft_ms"]["p99"] and 0 < row["itl_ms"]["p50"] <= row["itl_ms"]["p99"]
    cmd = row["server_command"]
    assert cmd[cmd.index("-np") + 1] == "2" and cmd[cmd.index("-c") + 1] == "4096" and "-cb" in cmd
    port = int(cmd[cmd.index("--port") + 1])
    assert _llama_servers(port) == []  # stopped
    assert (out / "llama-server.log").stat().st_size > 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serving_py_stops_llama_server_when_interrupted(tmp_path, sig):
    import httpx
    import psutil

    _needs("llama-server")
    proc = subprocess.Popen(_serving(tmp_path / "serving", "--concurrency", "1", "--requests", "200",
                                     "--max-tokens", "64"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        server = None
        while server is None and time.monotonic() < deadline and proc.poll() is None:
            kids = [p for p in psutil.Process(proc.pid).children() if p.name() == "llama-server"]
            if kids:
                cmd = kids[0].cmdline()
                health = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}/health"
                try:
                    if httpx.get(health, timeout=2).status_code == 200:
                        server = kids[0]
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        assert server is not None, "llama-server did not come up"
        time.sleep(1.0)  # requests under way
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
