"""A rank that dies mid-generation brings the command down with a message naming it; nothing
hangs and no rank process is left behind. Bad degrees are refused before any process starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli, rank_processes


def _start_long_generation(model: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("tensorpar")
    return subprocess.Popen(
        [str(exe), "generate", "--model", str(model), "--tp", "2", "--ignore-eos", "--max-new-tokens", "6000",
         "--prompt", "Once upon a time"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_generation(proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "generating" in line:
            return
        if not line and proc.poll() is not None:
            pytest.fail(f"command ended before generating: {proc.stderr.read()}")
    pytest.fail("generation did not start")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("victim", [1, 0])
def test_killed_rank_fails_fast_with_its_name(victim, tiny_chat_checkpoint):
    segments_before = set(Path("/dev/shm").glob("tensorpar-*"))
    proc = _start_long_generation(tiny_chat_checkpoint)
    try:
        _wait_for_generation(proc)
        time.sleep(1.0)
        ranks = {p.info["name"]: p for p in rank_processes() if p.ppid() == proc.pid}
        assert set(ranks) == {"tensorpar-r0", "tensorpar-r1"}
        killed_at = time.monotonic()
        os.kill(ranks[f"tensorpar-r{victim}"].pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert elapsed < 30
    assert f"rank {victim} of 2 failed: killed by signal SIGKILL" in err
    assert "Traceback" not in err
    time.sleep(0.5)
    assert not [p for p in rank_processes() if p.pid in {r.pid for r in ranks.values()} and p.is_running()
                and p.status() != "zombie"]
    assert set(Path("/dev/shm").glob("tensorpar-*")) <= segments_before  # no shared memory left behind


@pytest.mark.timeout(60)
def test_degree_above_head_count_is_refused_before_starting(tiny_chat_checkpoint):
    t0 = time.monotonic()
    r = cli("generate", "--model", str(tiny_chat_checkpoint), "--tp", "7", "--prompt", "hi")
    assert r.returncode == 1
    assert "tensor-parallel degree 7 is not valid" in r.stderr and "from 1 to 6" in r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model,needle", [
    ("/no/such/model", "no such model"),
    ("llama-9000b", "no such model"),
])
def test_unknown_model_gets_one_clear_line(model, needle):
    r = cli("generate", "--model", model, "--tp", "2", "--prompt", "hi")
    assert r.returncode == 1
    assert needle in r.stderr and "Traceback" not in r.stderr


NO_MAIN_GUARD = """
import sys
from tensorpar.distributed.launch import launch
# no `if __name__ == "__main__":`, so every spawned rank re-runs this and dies at start-up; the
# arguments are larger than a pipe holds, so a parent that wrote them to a dead rank would block
launch(2, "builtins:dict", (b"x" * 300_000,))
"""


@pytest.mark.timeout(120)
def test_ranks_that_die_at_start_up_fail_the_launch_instead_of_hanging(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(NO_MAIN_GUARD)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert r.returncode != 0
    assert "RankFailure" in r.stderr and "of 2 failed" in r.stderr
    assert time.monotonic() - t0 < 60
