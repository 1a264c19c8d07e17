"""The current llama.cpp build as a peer (``tensorpar.bench.llama_bin`` and the ``tensorpar bench``
row it makes): reading llama-bench's JSON, finding the binaries, writing a converted file once,
the line said when they are absent, and starting and stopping a server. Nothing here needs the
real binaries: the commands are stand-in scripts (the real ones: tests/integration/test_llama_cpp_peers.py)."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import textwrap
import time

import pytest

from tensorpar.bench import llama_bin
from tensorpar.bench.llama_bin import (
    LlamaServer,
    absent_message,
    bench_command,
    candidate_dirs,
    converted,
    decode_ms,
    find_bin_dir,
    parse_llama_bench,
    prefill_tokens_per_s,
    server_command,
)

# Recorded from the build `make peers` makes (llama.cpp 28a0537, build 194), 2 cores of an AMD EPYC:
#   llama-bench -m smollm2-f32.gguf -p 64 -n 4 -t 2 -r 2 -o json
RECORDED = r"""
[
  {
    "build_commit": "28a0537",
    "build_number": 194,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/work/peers/models/smollm2-f32.gguf",
    "model_type": "llama 256M all F32",
    "model_size": 538060032,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 64,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-12-07T09:52:49Z",
    "avg_ns": 114299873,
    "stddev_ns": 392198,
    "avg_ts": 559.933927,
    "stddev_ts": 1.921306,
    "samples_ns": [ 114577199, 114022547 ],
    "samples_ts": [ 558.575, 561.292 ]
  },
  {
    "build_commit": "28a0537",
    "build_number": 194,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/work/peers/models/smollm2-f32.gguf",
    "model_type": "llama 256M all F32",
    "model_size": 538060032,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 4,
    "n_depth": 0,
    "test_time": "2026-12-07T09:52:49Z",
    "avg_ns": 59174853,
    "stddev_ns": 543134,
    "avg_ts": 67.599129,
    "stddev_ts": 0.620456,
    "samples_ns": [ 58790799, 59558907 ],
    "samples_ts": [ 68.0379, 67.1604 ]
  }
]
"""


def test_recorded_llama_bench_output_gives_decode_and_prefill():
    entries = parse_llama_bench(RECORDED)
    assert [(e["n_prompt"], e["n_gen"]) for e in entries] == [(64, 0), (0, 4)]
    d = decode_ms(entries)
    assert d["best"] == pytest.approx(58790799 / 4 / 1e6)  # the faster of the two repetitions: 14.698 ms/token
    assert d["best"] == pytest.approx(1e3 / 68.0379, rel=1e-5)  # (its samples_ts, rounded)
    assert d["mean"] == pytest.approx(1e3 / 67.599129)  # 1000 / avg_ts
    assert (d["tokens"], d["repetitions"]) == (4, 2)
    p = prefill_tokens_per_s(entries)
    assert p["best"] == pytest.approx(64 / 114022547e-9) and p["best"] == pytest.approx(561.292, rel=1e-5)
    assert p["mean"] == pytest.approx(559.933927) and p["tokens"] == 64
    assert llama_bin.build_of(entries) == "28a0537 (build 194)"


def test_a_decode_only_run_has_no_prefill_and_noise_before_the_json_is_skipped():
    decode_only = [e for e in json.loads(RECORDED) if e["n_gen"]]  # what -p 0 -n 4 prints
    entries = parse_llama_bench("build: 28a0537 (194)\n" + json.dumps(decode_only))
    assert decode_ms(entries)["mean"] == pytest.approx(1e3 / 67.599129)
    del decode_only[0]["samples_ns"]  # without nanoseconds: its fastest tokens/s
    assert decode_ms(decode_only)["best"] == pytest.approx(1e3 / 68.0379)
    assert prefill_tokens_per_s(entries) is None
    with pytest.raises(ValueError, match="no JSON list"):
        parse_llama_bench("error: failed to load model")
    with pytest.raises(ValueError, match="avg_ts"):
        parse_llama_bench('[{"n_gen": 4}]')


def test_commands_are_the_ones_documented(tmp_path):
    b = tmp_path / "bin"
    assert bench_command(b, tmp_path / "m.gguf", 2, 32, 512, 3) == [
        str(b / "llama-bench"), "-m", str(tmp_path / "m.gguf"), "-p", "512", "-n", "32", "-t", "2", "-r", "3",
        "-o", "json"]
    assert bench_command(b, tmp_path / "m.gguf", 2, 4)[3:8] == ["-p", "0", "-n", "4", "-t"]
    assert server_command(b, tmp_path / "m.gguf", 2, 8123, parallel=16, alias="m") == [
        str(b / "llama-server"), "-m", str(tmp_path / "m.gguf"), "-t", "2", "-np", "16", "-cb", "-c", "32768",
        "--port", "8123", "--host", "127.0.0.1", "--no-cache-prompt", "--no-webui", "-a", "m"]


def _tool(path, body: str = "exit 0"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def no_checkout_tools(monkeypatch, tmp_path):
    """The checkout's own .peers/ out of the way: ``repo_root`` is an empty folder."""
    monkeypatch.setattr(llama_bin, "repo_root", lambda: tmp_path / "checkout")
    monkeypatch.delenv(llama_bin.ENV, raising=False)
    monkeypatch.delenv(llama_bin.ENV_OLD, raising=False)


def test_discovery_env_var_first_then_checkout_then_current_dir(tmp_path, no_checkout_tools):
    given, cwd = tmp_path / "given", tmp_path / "cwd"
    _tool(given / "llama-bench")
    _tool(cwd / ".peers/llama.cpp/bin/llama-bench")
    assert find_bin_dir("llama-bench", {llama_bin.ENV: str(given)}, cwd) == given
    assert find_bin_dir("llama-bench", {llama_bin.ENV_OLD: str(given)}, cwd) == given  # the older name
    assert find_bin_dir("llama-bench", {}, cwd) == (cwd / ".peers/llama.cpp/bin").resolve()
    _tool(tmp_path / "checkout/.peers/llama.cpp/bin/llama-bench")
    assert find_bin_dir("llama-bench", {}, cwd) == (tmp_path / "checkout/.peers/llama.cpp/bin").resolve()
    # a variable that is set is the only place looked in
    assert find_bin_dir("llama-bench", {llama_bin.ENV: str(tmp_path / "empty")}, cwd) is None
    assert candidate_dirs({llama_bin.ENV: str(tmp_path / "empty")}, cwd) == [tmp_path / "empty"]


def test_a_file_that_is_not_executable_is_not_found(tmp_path, no_checkout_tools):
    given = tmp_path / "given"
    given.mkdir()
    (given / "llama-bench").write_text("not a program")
    assert find_bin_dir("llama-bench", {llama_bin.ENV: str(given)}) is None


def test_absent_message_names_where_it_looked_and_make_peers(tmp_path, no_checkout_tools):
    msg = absent_message("llama-bench", {}, tmp_path / "cwd")
    assert msg.startswith("llama.cpp (current build): no llama-bench in ")
    assert str(tmp_path / "checkout/.peers/llama.cpp/bin") in msg and str(tmp_path / "cwd/.peers/llama.cpp/bin") in msg
    assert "`make peers`" in msg and "TENSORPAR_LLAMA_CPP" in msg and "\n" not in msg


def _gguf(path, file_type: int | None = 3):
    """A GGUF file with no tensors; ``general.file_type`` 3 is llama.cpp's Q4_1."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    if file_type is not None:
        w.add_file_type(file_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_file_type_is_read_from_the_header(tmp_path):
    assert llama_bin.file_type(_gguf(tmp_path / "a.gguf", 3)) == "Q4_1"
    assert llama_bin.file_type(_gguf(tmp_path / "b.gguf", 0)) == "F32"
    assert llama_bin.file_type(_gguf(tmp_path / "c.gguf", 15)) == "Q4_K_M"
    assert llama_bin.file_type(_gguf(tmp_path / "d.gguf", None)) is None


# A stand-in llama-quantize: logs its arguments, then copies its input to its output.
QUANTIZE = 'echo "$@" >> "$(dirname "$0")/calls.log"\ncp "$2" "$3"'


@pytest.mark.timeout(60)
def test_conversion_is_written_once_and_again_when_the_source_changes(tmp_path):
    bin_dir, cache = tmp_path / "bin", tmp_path / "cache"
    _tool(bin_dir / "llama-quantize", QUANTIZE)
    src = _gguf(tmp_path / "model.Q4_1.gguf")
    said = []
    out = converted(bin_dir, src, "F32", cache, threads=2, log=said.append)
    assert out == cache / "model.Q4_1.F32.gguf" and out.read_bytes() == src.read_bytes()
    calls = (bin_dir / "calls.log").read_text().splitlines()
    assert calls == [f"--allow-requantize {src} {cache / 'model.Q4_1.F32.gguf.tmp'} F32 2"]
    assert not (cache / "model.Q4_1.F32.gguf.tmp").exists()
    assert said[0] == f"writing model.Q4_1.gguf as F32 with llama-quantize into {out} (once: later runs reuse it)"
    assert said[1].startswith("wrote model.Q4_1.F32.gguf (0 MB) in ")
    record = json.loads((cache / "model.Q4_1.F32.gguf.source.json").read_text())
    assert record["source"] == str(src.resolve()) and record["size"] == src.stat().st_size

    said.clear()
    assert converted(bin_dir, src, "F32", cache, log=said.append) == out  # cached: not run again, nothing said
    assert len((bin_dir / "calls.log").read_text().splitlines()) == 1 and said == []

    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source changed: written again
    converted(bin_dir, src, "F32", cache, log=said.append)
    assert len((bin_dir / "calls.log").read_text().splitlines()) == 2 and len(said) == 2


@pytest.mark.timeout(60)
def test_a_failed_conversion_says_why_and_leaves_nothing(tmp_path):
    bin_dir, cache = tmp_path / "bin", tmp_path / "cache"
    _tool(bin_dir / "llama-quantize", 'echo "main: invalid ftype F33" >&2\nexit 1')
    src = _gguf(tmp_path / "m.gguf")
    with pytest.raises(RuntimeError, match="llama-quantize could not write m.gguf as F33: main: invalid ftype F33"):
        converted(bin_dir, src, "F33", cache)
    assert list(cache.iterdir()) == []


@pytest.mark.timeout(60)
def test_bench_peer_rows_from_llama_bench(tmp_path, monkeypatch):
    """``tensorpar bench``'s current-build rows: the file's own type and F32 (written once), each from
    one llama-bench run at the given threads, ms/token its fastest repetition."""
    from tensorpar.bench.peers import llama_cpp_current

    bin_dir = tmp_path / "bin"
    (tmp_path / "recorded.json").write_text(RECORDED)
    _tool(bin_dir / "llama-bench", f'echo "$@" >> "$(dirname "$0")/bench.log"\ncat {tmp_path / "recorded.json"}')
    _tool(bin_dir / "llama-quantize", QUANTIZE)
    monkeypatch.setenv("TENSORPAR_CACHE_DIR", str(tmp_path / "cache"))
    src = _gguf(tmp_path / "model.gguf")
    said = []
    rows = llama_cpp_current(str(src), ["none", "int8"], 2, 4, 64, repeats=2, log=said.append,
                             env={llama_bin.ENV: str(bin_dir)})
    assert [(r["type"], r["file_type"], r["status"]) for r in rows] == [
        ("native", "Q4_1", "ok"), ("F32", "F32", "ok"), ("Q8_0", "Q8_0", "ok")]
    native, f32, _ = rows
    assert native["peer"] == "llama.cpp (current build)" and native["threads"] == 2 and native["file"] == str(src)
    assert native["decode_ms_per_token"]["1"] == pytest.approx(58790799 / 4 / 1e6)
    assert native["decode_ms_per_token_mean"]["1"] == pytest.approx(1e3 / 67.599129)
    assert native["prefill_tokens_per_s"] == pytest.approx(64 / 114022547e-9)
    assert native["build"] == "28a0537 (build 194)"
    converted_f32 = tmp_path / "cache" / "llama.cpp" / "model.F32.gguf"
    assert f32["file"] == str(converted_f32) and said[0].startswith("writing model.gguf as F32")
    runs = (bin_dir / "bench.log").read_text().splitlines()
    assert runs[:2] == [f"-m {src} -p 64 -n 4 -t 2 -r 2 -o json", f"-m {converted_f32} -p 64 -n 4 -t 2 -r 2 -o json"]


def test_an_f32_file_is_its_own_f32_row_and_a_failure_is_the_result(tmp_path):
    from tensorpar.bench.peers import llama_cpp_current

    bin_dir = tmp_path / "bin"
    _tool(bin_dir / "llama-bench", 'echo "error: failed to load model" >&2\nexit 1')
    (row,) = llama_cpp_current(str(_gguf(tmp_path / "m.gguf", 0)), ["none"], 2, 4, 64,
                               env={llama_bin.ENV: str(bin_dir)})
    assert (row["type"], row["file_type"], row["status"]) == ("native", "F32", "failed")
    assert row["reason"] == "RuntimeError: llama-bench failed (exit code 1): error: failed to load model"


def test_bench_peer_without_the_binary_is_one_skipped_row_saying_make_peers(tmp_path, no_checkout_tools, monkeypatch):
    from tensorpar.bench.peers import llama_cpp_current

    monkeypatch.chdir(tmp_path)
    (row,) = llama_cpp_current(str(_gguf(tmp_path / "m.gguf")), ["none"], 2, 4, 64)
    assert row["status"] == "skipped" and row["peer"] == "llama.cpp (current build)"
    assert row["reason"] == absent_message("llama-bench") and "`make peers`" in row["reason"]


def test_bench_peer_skips_a_model_that_is_not_gguf(tiny_checkpoints):
    from tensorpar.bench.peers import llama_cpp_current

    (row,) = llama_cpp_current(str(tiny_checkpoints["llama"]), ["none"], 2, 4, 16)
    assert row["status"] == "skipped" and "is not a GGUF file" in row["reason"]


def _result_with_both_builds() -> dict:
    return {"settings": {"model": "m.gguf", "batch": [1, 8]}, "tensorpar": [
        {"status": "ok", "tp": 1, "decode_ms_per_token": {"1": 20.0, "8": 40.0}},
        {"status": "ok", "tp": 2, "decode_ms_per_token": {"1": 25.0, "8": 45.0}},
        {"status": "ok", "tp": 1, "quantization": "gguf", "decode_ms_per_token": {"1": 12.0, "8": 30.0}},
    ], "peers": {"transformers": None, "transformers_tp_plan": [], "llama_cpp": [
        {"peer": "llama.cpp 2025 (llama-cpp-python)", "tp": 1, "status": "ok", "type": "F32", "threads": 2,
         "decode_ms_per_token": {"1": 22.0}, "prefill_tokens_per_s": 500.0},
    ], "llama_cpp_current": [
        {"peer": "llama.cpp (current build)", "tp": 1, "status": "ok", "type": "native", "file_type": "Q4_1",
         "threads": 2, "decode_ms_per_token": {"1": 6.0}, "prefill_tokens_per_s": 300.0},
        {"peer": "llama.cpp (current build)", "tp": 1, "status": "ok", "type": "F32", "file_type": "F32",
         "threads": 2, "decode_ms_per_token": {"1": 16.0}, "prefill_tokens_per_s": 540.0},
        {"peer": "llama.cpp (current build)", "tp": 1, "status": "failed", "type": "Q8_0", "file_type": "Q8_0",
         "threads": 2, "reason": "RuntimeError: boom"},
    ]}}


def test_table_puts_both_builds_beside_tensorpar():
    from tensorpar.bench.report import llama_cpp_table

    lines = llama_cpp_table(_result_with_both_builds()).splitlines()
    assert "peer" in lines[1] and "TP=1" in lines[1] and "TP=2" in lines[1]
    old, native, f32, failed = lines[3:7]
    assert "llama.cpp 2025 (llama-cpp-python)" in old and "20.00 (0.91x)" in old and "25.00 (1.14x)" in old
    assert "llama.cpp (current build)" in native and "native (Q4_1)" in native and "gguf" in native
    assert "12.00 (2.00x)" in native and "6.00" in native and "300" in native
    assert "16.00" in f32 and "20.00 (1.25x)" in f32 and "25.00 (1.56x)" in f32
    assert failed.rstrip().endswith("FAILED: RuntimeError: boom")


def test_plot_draws_each_builds_rows(tmp_path):
    from tensorpar.bench.plots import _llama_cpp_lines, plot_latency_vs_tp

    result = _result_with_both_builds()
    drawn = [(r["peer"], r["type"]) for _, r in _llama_cpp_lines(result)]
    assert drawn == [("llama.cpp (current build)", "native"), ("llama.cpp (current build)", "F32"),
                     ("llama.cpp 2025 (llama-cpp-python)", "F32")]
    path = plot_latency_vs_tp(result, tmp_path / "latency_vs_tp.png")
    assert path.read_bytes().startswith(b"\x89PNG")


# A stand-in server: /health answers 200 after a short wait; with IGNORE_TERM it outlives SIGTERM.
SERVER = textwrap.dedent("""
    import http.server, os, signal, sys, time
    if os.environ.get("IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("FAIL"):
        print("error: failed to load model", flush=True)
        sys.exit(1)
    time.sleep(0.3)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    print("listening", flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def _server(tmp_path, **env):
    from tensorpar.distributed.host import free_port

    script = tmp_path / "server.py"
    script.write_text(SERVER)
    port = free_port()
    prefix = [f"{k}={v}" for k, v in env.items()]
    return LlamaServer(["env", *prefix, sys.executable, str(script), str(port)], port, tmp_path / "server.log",
                       start_timeout_s=30, stop_timeout_s=2)


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(60)
def test_server_is_ready_on_health_and_stopped_by_an_error_inside(tmp_path):
    import httpx

    server = _server(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with server as base:
            pid = server.proc.pid
            assert httpx.get(f"{base}/health").status_code == 200
            raise KeyboardInterrupt  # as Ctrl-C would
    assert server.proc is None and _gone(pid)
    assert "listening" in (tmp_path / "server.log").read_text()


@pytest.mark.timeout(60)
def test_server_that_ignores_sigterm_is_killed(tmp_path):
    server = _server(tmp_path, IGNORE_TERM=1)
    server.start()
    pid = server.proc.pid
    t = time.monotonic()
    assert server.stop() == -signal.SIGKILL
    assert _gone(pid) and time.monotonic() - t < 10


@pytest.mark.timeout(60)
def test_server_that_exits_at_start_says_why(tmp_path):
    server = _server(tmp_path, FAIL=1)
    with pytest.raises(RuntimeError, match="exited with code 1 before it was ready: error: failed to load model"):
        server.start()
    assert server.proc is None


@pytest.mark.timeout(60)
def test_serving_py_without_llama_server_says_so_before_anything_runs(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py"
    env = dict(os.environ, TENSORPAR_LLAMA_CPP=str(tmp_path / "empty"))
    r = subprocess.run([sys.executable, str(script), "--tp", "1", "--llama-server", "smollm2-135m",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=50, env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"llama.cpp (current build): no llama-server in {tmp_path / 'empty'}; "
                                f"{llama_bin.HOW_TO_GET}")
    assert not (tmp_path / "out" / "serving.json").exists()
