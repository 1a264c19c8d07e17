"""Faults injected into ``tensorpar generate``: a rank killed while starting up, prefilling
or decoding, a rank stopped mid-decode, no room for the shared-memory segment. Each ends in one line
naming the cause (or, for the segment, a warning and a slower but correct run), within a bound,
with no rank process or shared-memory name left behind."""

from __future__ import annotations

import os
import signal
import time

import pytest
from faultkit import error_line, finish, leftovers, nothing_left, ranks_of, start

LONG_PROMPT = "Once upon a time " * 400  # about 1600 tokens: a prefill that lasts (and, with 6000 new, fits 8192)


def _generate(model, tp: int, prompt: str = "Once upon a time", until: str = "generating", timeout_s=None):
    args = ["generate", "--model", str(model), "--tp", str(tp), "--ignore-eos", "--max-new-tokens", "6000",
            "--prompt", prompt] + (["--timeout", str(timeout_s)] if timeout_s else [])
    return start(*args, until=until)[0]


def _inject(proc, tp: int, name: str, sig: int, wait_s: float = 0.0) -> tuple[str, float, dict]:
    """Once all ``tp`` ranks of ``proc`` run, send ``sig`` to rank process ``name`` after
    ``wait_s``: (stderr, seconds until ``proc`` ended, its ranks)."""
    try:
        deadline = time.monotonic() + 30
        while len(ranks := ranks_of(proc)) < tp:
            assert time.monotonic() < deadline, "the rank processes never appeared"
            time.sleep(0.05)
        time.sleep(wait_s)
        t = time.monotonic()
        os.kill(ranks[name].pid, sig)
        return finish(proc), time.monotonic() - t, ranks
    finally:
        if proc.poll() is None:
            proc.kill()


PHASES = {  # phase: (prompt, the stderr line to wait for, then seconds to wait)
    "starting up": ("Once upon a time", None, 1.0),  # the ranks exist: importing, joining the group, loading
    "prefilling": (LONG_PROMPT, "generating", 0.0),
    "decoding": ("Once upon a time", "generating", 0.5),
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("tp, victim, phase", [(2, 1, "decoding"), (2, 0, "decoding"), (3, 2, "decoding"),
                                               (2, 1, "starting up"), (3, 1, "prefilling")])
def test_sigkill_of_a_rank(tp, victim, phase, tiny_chat_checkpoint, record):
    before = leftovers()
    prompt, until, wait_s = PHASES[phase]
    proc = _generate(tiny_chat_checkpoint, tp, prompt, until)
    err, seconds, ranks = _inject(proc, tp, f"tensorpar-r{victim}", signal.SIGKILL, wait_s)
    line = error_line(err)
    assert f"rank {victim} of {tp} failed: killed by signal SIGKILL" in line
    assert set(ranks) == {f"tensorpar-r{r}" for r in range(tp)} and seconds < 30
    nothing_left(ranks, before)
    record(fault=f"SIGKILL of rank {victim} while {phase}", command="generate", layout=f"tp={tp}", sees=line,
           seconds=round(seconds, 1), lost="the generation in progress (nothing was saved)")


@pytest.mark.timeout(150)
def test_sigstop_of_a_rank_mid_decode_is_a_timeout_naming_it(tiny_chat_checkpoint, record):
    before = leftovers()
    proc = _generate(tiny_chat_checkpoint, 2, timeout_s=5)
    err, seconds, ranks = _inject(proc, 2, "tensorpar-r1", signal.SIGSTOP, 0.5)
    line = error_line(err)
    assert "rank 1 of 2 failed: did not answer within 5 s" in line
    assert seconds < 15  # the timeout, then a forced stop of the group (a stopped rank ignores SIGTERM)
    nothing_left(ranks, before)
    record(fault="SIGSTOP of rank 1 while decoding (--timeout 5)", command="generate", layout="tp=2", sees=line,
           seconds=round(seconds, 1), lost="the generation in progress")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where, why", [("/dev/null", "a file, not a directory"),
                                        ("/nonexistent/shm", "a directory that does not exist")])
def test_no_room_for_the_shared_memory_segment_falls_back_to_gloo(where, why, tiny_chat_checkpoint, record):
    from helpers import cli

    before = leftovers()
    t = time.monotonic()
    args = ["generate", "--model", str(tiny_chat_checkpoint), "--prompt", "Once upon a time", "--max-new-tokens", "6",
            "--ignore-eos", "--json"]
    r = cli(*args, "--tp", "2", env={**os.environ, "TENSORPAR_SHM_DIR": where}, timeout=100)
    seconds = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("tensorpar: warning:")]
    assert len(warnings) == 1 and f"cannot create a shared-memory segment in {where}" in warnings[0], r.stderr
    assert "collectives go through gloo instead" in warnings[0] and "Traceback" not in r.stderr
    import json

    fallback = json.loads(r.stdout)
    assert fallback["backend"] == "gloo"
    alone = json.loads(cli(*args, "--tp", "1").stdout)
    assert fallback["completions"][0]["token_ids"] == alone["completions"][0]["token_ids"]
    assert leftovers() <= before
    record(fault=f"no shared-memory segment: TENSORPAR_SHM_DIR is {why}", command="generate", layout="tp=2",
           sees=warnings[0], seconds=round(seconds, 1), lost="nothing (the run completes over gloo, slower)")


@pytest.mark.timeout(120)
def test_weights_that_do_not_fit_are_refused_before_loading(tiny_chat_checkpoint, record):
    from helpers import cli

    t = time.monotonic()
    r = cli("generate", "--model", str(tiny_chat_checkpoint), "--tp", "2", "--prompt", "hi", "--max-memory", "2MiB",
            timeout=100)
    seconds = time.monotonic() - t
    line = error_line(r.stderr)
    assert r.returncode == 1 and line.startswith("tensorpar: error: out of memory before loading: at tp=2 a rank needs "
                                                 "about ") and "more than --max-memory 2.0 MiB" in line, line
    assert "loading weights" not in r.stderr
    record(fault="the weights do not fit (--max-memory 2MiB)", command="generate", layout="tp=2", sees=line,
           seconds=round(seconds, 1), lost="nothing (refused before any rank started)")
