"""Faults injected into ``tensorpar serve``: a rank killed while the server is idle or streaming,
a rank stopped mid-stream. The server ends every request in flight with an OpenAI-format error
event, says which rank failed in one line, and exits non-zero, leaving nothing behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from faultkit import error_line, finish, leftovers, nothing_left, ranks_of, served_port, start


def _serve(model, tp: int, *extra: str):
    proc, banner = start("serve", "--model", str(model), "--tp", str(tp), "--port", "0", *extra, until="serving")
    return proc, served_port(banner)


def _stream(port: int, events: list, started: threading.Event) -> None:
    """A long streamed completion; every event it receives goes to ``events``."""
    body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
        events.append(r.status_code)
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("tp, victim, sig, phase", [(2, 1, signal.SIGKILL, "idle"),
                                                    (3, 2, signal.SIGKILL, "streaming"),
                                                    (2, 1, signal.SIGSTOP, "streaming")])
def test_a_rank_fails_under_the_server(tp, victim, sig, phase, tiny_chat_checkpoint, record):
    before = leftovers()
    proc, port = _serve(tiny_chat_checkpoint, tp, *(["--timeout", "5"] if sig == signal.SIGSTOP else []))
    try:
        ranks = ranks_of(proc)
        events: list = []
        started = threading.Event()
        client = None
        if phase == "streaming":
            client = threading.Thread(target=_stream, args=(port, events, started), daemon=True)
            client.start()
            assert started.wait(30), events
            time.sleep(0.3)
        t = time.monotonic()
        os.kill(ranks[f"tensorpar-r{victim}"].pid, sig)
        err = finish(proc, 60)
        seconds = time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
    line = error_line(err)
    how = "killed by signal SIGKILL" if sig == signal.SIGKILL else "did not answer within 5 s"
    assert f"rank {victim} of {tp} failed: {how}" in line and proc.returncode != 0
    assert seconds < (15 if sig == signal.SIGSTOP else 10)
    lost = "nothing (no request was in flight)"
    if client is not None:
        client.join(30)
        assert events[0] == 200 and events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]  # the stream ends with an OpenAI-format error event
        assert error["code"] == "engine_error" and f"rank {victim} of {tp} failed" in error["message"]
        lost = "the request in flight (its stream ends with an error event, then [DONE])"
    nothing_left(ranks, before)
    name = "SIGKILL" if sig == signal.SIGKILL else "SIGSTOP"
    record(fault=f"{name} of rank {victim} while {phase}" + (" (--timeout 5)" if sig == signal.SIGSTOP else ""),
           command="serve", layout=f"tp={tp}", sees=line, seconds=round(seconds, 1), lost=lost)


@pytest.mark.timeout(120)
def test_a_port_already_in_use_is_named_before_the_model_loads(tiny_chat_checkpoint, record):
    import socket

    from helpers import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t = time.monotonic()
        r = cli("serve", "--model", str(tiny_chat_checkpoint), "--port", str(port), timeout=100)
        seconds = time.monotonic() - t
    line = error_line(r.stderr)
    assert r.returncode != 0 and line == f"tensorpar: error: could not listen on http://127.0.0.1:{port}: address already in use"
    assert "loading weights" not in r.stderr and "ERROR" not in r.stderr  # refused before the model loads
    record(fault="the HTTP port is taken", command="serve", layout="tp=1", sees=line, seconds=round(seconds, 1),
           lost="nothing (the server never started)")
