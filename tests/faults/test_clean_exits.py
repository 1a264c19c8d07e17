"""A normal end leaves nothing: ``generate``, ``serve`` (stopped by SIGINT) and a script using
``LLM`` at tp=2 print no warning on the way out (no "leaked semaphore" from multiprocessing's
resource tracker, no traceback) and leave no process, zombie or shared-memory name behind."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import psutil
import pytest
from helpers import cli
from faultkit import finish, leftovers, served_port, start

NOISE = ("warn", "Warn", "leaked", "Traceback", "Error", "error")


def _quiet(stderr: str) -> None:
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    noisy = [ln for ln in lines if any(word in ln for word in NOISE)]
    assert not noisy, noisy


def _no_descendants_of(pid: int) -> None:
    left = [p for p in psutil.process_iter(["name", "ppid"]) if (p.info["name"] or "").startswith("tensorpar-r")
            and p.info["ppid"] in (pid, 1)]
    assert not left, left


@pytest.mark.timeout(120)
def test_generate_exits_quietly(tiny_chat_checkpoint):
    before = leftovers()
    r = cli("generate", "--model", str(tiny_chat_checkpoint), "--tp", "2", "--prompt", "Hello", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    _quiet(r.stderr)
    assert leftovers() <= before


@pytest.mark.timeout(120)
def test_serve_stopped_by_sigint_exits_quietly(tiny_chat_checkpoint):
    before = leftovers()
    proc, banner = start("serve", "--model", str(tiny_chat_checkpoint), "--tp", "2", "--port", "0", until="serving")
    r = httpx.post(f"http://127.0.0.1:{served_port(banner)}/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 200
    proc.send_signal(signal.SIGINT)
    err = finish(proc, 60)
    assert proc.returncode == 0, err
    _quiet(err)
    _no_descendants_of(proc.pid)
    assert leftovers() <= before


SCRIPT = """
import sys
from tensorpar import LLM

if __name__ == "__main__":
    llm = LLM(sys.argv[1], tp=2)
    print(llm.generate(["Hello"], max_new_tokens=3)[0].token_ids)
"""


@pytest.mark.timeout(120)
def test_a_script_using_llm_exits_quietly_without_closing_it(tiny_chat_checkpoint, tmp_path):
    before = leftovers()
    script = tmp_path / "use_llm.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(tiny_chat_checkpoint)], capture_output=True, text=True,
                       timeout=100)
    assert r.returncode == 0 and len(eval(r.stdout)) == 3, r.stderr
    _quiet(r.stderr)
    assert leftovers() <= before


@pytest.mark.timeout(120)
def test_a_script_without_a_main_guard_is_told_so(tiny_chat_checkpoint, tmp_path):
    before = leftovers()
    script = tmp_path / "unguarded.py"
    script.write_text("import sys\nfrom tensorpar import LLM\nLLM(sys.argv[1], tp=2)\n")
    r = subprocess.run([sys.executable, str(script), str(tiny_chat_checkpoint)], capture_output=True, text=True,
                       timeout=100)
    assert r.returncode != 0
    assert ('tensorpar: error: a rank process re-ran the top level of your script, which starts ranks again: guard it '
            'with `if __name__ == "__main__":`') in r.stderr
    assert leftovers() <= before
