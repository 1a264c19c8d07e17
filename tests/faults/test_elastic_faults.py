"""Faults injected into ``tensorpar serve --elastic`` and ``serve --dp 2``: ranks killed or stopped
while 4 (or 8) greedy streams of 64 tokens run, through the official ``openai`` client. Every
stream pauses and completes with no error, its text that of an undisturbed run at the degree the
server has after the fault; ``/health`` says what was lost and what the layout is now; nothing
is left behind once the server stops."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest
from faultkit import error_line, finish, leftovers, served_port, start

TOKENS = 64
LONG = 256  # (--dp 2 runs 4 streams a replica at tp=1: 64 tokens may be over before the kill lands)
PROMPTS = [f"Elastic request {i}:" for i in range(4)]


def _serve(model, *flags: str):
    proc, banner = start("serve", "--model", str(model), "--port", "0", "--disable-log-requests", *flags,
                         until="serving")
    return proc, f"http://127.0.0.1:{served_port(banner)}"


def _ranks(proc) -> dict[str, psutil.Process]:
    """The server's rank processes by name (``tensorpar-rN``): its replicas' leaders are its
    children, their other ranks its grandchildren (a standby leader is not yet a rank)."""
    for _ in range(100):
        found = {p.name(): p for p in psutil.Process(proc.pid).children(recursive=True)
                 if p.name().startswith("tensorpar-r")}
        if found:
            return found
        time.sleep(0.1)
    return {}


class Streams:
    """Greedy streamed completions of ``prompts``, one thread each: every chunk's time, the text,
    the finish reason and the usage each stream ended with."""

    def __init__(self, base: str, model: str, prompts: list[str], tokens: int = TOKENS):
        self.client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        self.model, self.n, self.max_tokens = model, len(prompts), tokens
        self.stamps: list[list[float]] = [[] for _ in prompts]
        self.text, self.finish, self.tokens = [""] * self.n, [None] * self.n, [0] * self.n
        self.errors: list = []
        self.threads = [threading.Thread(target=self._run, args=(i, p), daemon=True) for i, p in enumerate(prompts)]
        for t in self.threads:
            t.start()

    def _run(self, i: int, prompt: str) -> None:
        try:
            for chunk in self.client.completions.create(model=self.model, prompt=prompt, max_tokens=self.max_tokens,
                                                        temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                        stream_options={"include_usage": True}):
                if chunk.choices:
                    self.stamps[i].append(time.monotonic())
                    self.text[i] += chunk.choices[0].text
                    self.finish[i] = chunk.choices[0].finish_reason or self.finish[i]
                if chunk.usage is not None:
                    self.tokens[i] = chunk.usage.completion_tokens
        except Exception as e:  # noqa: BLE001 - asserted on
            self.errors.append(e)

    def wait_until_each_has(self, chunks: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while any(len(s) < chunks for s in self.stamps):
            assert time.monotonic() < deadline and not self.errors, (self.errors, [len(s) for s in self.stamps])
            time.sleep(0.005)

    def join(self, since: float) -> float:
        """Wait for every stream; the longest pause any of them saw after ``since`` (the fault),
        from ``since`` to its next chunk or between two chunks after it."""
        for t in self.threads:
            t.join(120)
        assert not self.errors, self.errors
        assert self.finish == ["length"] * self.n and self.tokens == [self.max_tokens] * self.n, (self.finish, self.tokens)
        pauses = []
        for stamps in self.stamps:
            times = [since] + [t for t in stamps if t > since]
            assert len(times) > 1, "a stream ended before the fault"
            pauses.append(max(b - a for a, b in zip(times, times[1:])))
        return max(pauses)


def _undisturbed(base: str, model: str, prompts: list[str], tokens: int = TOKENS) -> list[str]:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    return [client.completions.create(model=model, prompt=p, max_tokens=tokens, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in prompts]


def _metric(base: str, name: str, replica: str = "0") -> float:
    text = httpx.get(f"{base}/metrics").text
    return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(f'{name}{{replica="{replica}"}}')))


def _fault_and_resume(proc, base, model, victim: str, sig, tp: int) -> tuple[float, str, bool]:
    """``sig`` to rank ``victim`` while 4 streams run at ``tp``: they complete, the server is at
    tp - 1 and says so. Returns the longest pause of a stream (seconds), /health's error, and
    whether each text equals an undisturbed run at tp - 1."""
    streams = Streams(base, model, PROMPTS)
    streams.wait_until_each_has(3)
    target = _ranks(proc)[victim]
    t = time.monotonic()
    os.kill(target.pid, sig)
    seconds = streams.join(t)
    health = httpx.get(f"{base}/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
    error = health.json()["error"]
    assert error.endswith(f"; tp {tp} -> {tp - 1}"), error
    assert _metric(base, "tensorpar_replica_tensor_parallel_size") == tp - 1
    equal = streams.text == _undisturbed(base, model, PROMPTS)  # served at tp - 1 now
    _no_block_held(base)
    return seconds, error, equal


def _stop(proc) -> str:
    """SIGTERM: the server drains and exits 0, without a traceback. Its remaining stderr."""
    proc.send_signal(signal.SIGTERM)
    err = finish(proc, 60)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    return err


def _nothing_left(processes: list, before: set) -> None:
    """None of ``processes`` is left (zombies aside), nor any new shared-memory name."""
    time.sleep(0.5)
    alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
    assert leftovers() <= before, leftovers() - before


def _no_block_held(base: str, replicas: str = "0") -> None:
    """Once every request has ended, no sequence runs and the replicas' KV blocks are all free."""
    for _ in range(50):
        if all(_metric(base, "tensorpar_num_requests_running", r) == 0
               and _metric(base, "tensorpar_kv_cache_usage_ratio", r) == 0 for r in replicas):
            return
        time.sleep(0.1)
    raise AssertionError(httpx.get(f"{base}/metrics").text)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("victim", [0, 1, 2])
def test_a_rank_killed_mid_stream_costs_a_degree_not_the_streams(victim, tiny_chat_checkpoint, record):
    """SIGKILL of rank 0 (the replica's scheduler), 1 or 2 of tp=3: all 4 streams complete as
    at tp=2. After rank 0, a second kill shrinks to tp=1, and a third ends the server with one line."""
    before = leftovers()
    model = str(tiny_chat_checkpoint)
    proc, base = _serve(model, "--tp", "3", "--elastic")
    seen = []
    try:
        seconds, error, equal = _fault_and_resume(proc, base, model, f"tensorpar-r{victim}", signal.SIGKILL, 3)
        assert error.startswith(f"rank {victim} of 3 failed: killed by signal SIGKILL"), error
        assert equal
        assert set(_ranks(proc)) == {"tensorpar-r0", "tensorpar-r1"}
        seen.append(psutil.Process(proc.pid).children(recursive=True))
        if victim == 0:
            again, error2, equal2 = _fault_and_resume(proc, base, model, "tensorpar-r1", signal.SIGKILL, 2)
            assert error2.startswith("rank 1 of 2 failed: killed by signal SIGKILL") and equal2, error2
            assert _metric(base, "tensorpar_rank_failures_total") == 2
            seen.append(psutil.Process(proc.pid).children(recursive=True))
            os.kill(_ranks(proc)["tensorpar-r0"].pid, signal.SIGKILL)
            err = finish(proc, 60)
            assert proc.returncode != 0
            assert error_line(err) == ("tensorpar: error: rank 0 of 1 failed: killed by signal SIGKILL; "
                                       "no smaller layout is left to serve on")
        else:
            err = _stop(proc)
        assert f"warning: rank {victim} of 3 failed: killed by signal SIGKILL; 4 request(s) in flight resume" in err
        assert re.search(r"serving again at tp=2 after [\d.]+ s; 4 request\(s\) resumed", err), err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    _nothing_left([p for group in seen for p in group], before)
    layouts = "tp=3 -> 2 -> 1" if victim == 0 else "tp=3 -> 2"
    record(fault=f"SIGKILL of rank {victim} while 4 streams run" + (", then of rank 1, then of rank 0" if victim == 0 else ""),
           command="serve --elastic", layout=layouts,
           sees=f"4 streams pause and complete (finish_reason length), text {'equal to' if equal else 'unlike'} an "
                f"undisturbed tp=2 run; /health: degraded, {error}"
                + ("; after the third kill: no smaller layout is left to serve on" if victim == 0 else ""),
           seconds=round(seconds, 1), lost="nothing (the requests in flight resume from their streamed tokens)")


@pytest.mark.timeout(240)
def test_a_stopped_scheduler_rank_is_replaced_after_the_timeout(tiny_chat_checkpoint, record):
    """SIGSTOP of rank 0 (alive, silent) with --timeout 5: the front end gives up on it after 5 s,
    kills its replica and resumes the 4 streams at tp=2."""
    before = leftovers()
    model = str(tiny_chat_checkpoint)
    proc, base = _serve(model, "--tp", "3", "--elastic", "--timeout", "5")
    try:
        group = psutil.Process(proc.pid).children(recursive=True)
        seconds, error, equal = _fault_and_resume(proc, base, model, "tensorpar-r0", signal.SIGSTOP, 3)
        assert error.startswith("rank 0 of 3 failed: did not answer within 5 s") and equal, error
        assert 5 <= seconds < 20
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    _nothing_left(group, before)
    record(fault="SIGSTOP of rank 0 while 4 streams run (--timeout 5)", command="serve --elastic", layout="tp=3 -> 2",
           sees=f"4 streams pause and complete, text {'equal to' if equal else 'unlike'} an undisturbed tp=2 run; "
                f"/health: degraded, {error}",
           seconds=round(seconds, 1), lost="nothing (the requests in flight resume from their streamed tokens)")


@pytest.mark.timeout(240)
def test_a_killed_replica_heals_and_its_streams_finish_on_the_other(tiny_chat_checkpoint, record):
    """--dp 2 (tp=1 each): SIGKILL of replica 1's leader with 8 streams of 256 tokens in flight: all 8 complete
    (replica 1's resume on replica 0), /health is degraded until replica 1 is back, which it is
    within 60 s, and it serves again."""
    before = leftovers()
    model = str(tiny_chat_checkpoint)
    proc, base = _serve(model, "--tp", "1", "--dp", "2")
    prompts = [f"Replica request {i}:" for i in range(8)]
    try:
        first = _ranks(proc)
        assert set(first) == {"tensorpar-r0", "tensorpar-r1"}  # each replica's leader; the server holds no weights
        solo = _undisturbed(base, model, prompts, LONG)
        streams = Streams(base, model, prompts, LONG)
        streams.wait_until_each_has(3)
        assert _metric(base, "tensorpar_replica_outstanding_requests", "1") == 4  # the least busy replica took each
        t = time.monotonic()
        first["tensorpar-r1"].kill()
        seconds = streams.join(t)
        assert streams.text == solo
        health = httpx.get(f"{base}/health").json()
        assert health["status"] == "degraded" and "replica 1: rank 0 of 1 failed: killed by signal SIGKILL" in health["error"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/health").json()["status"] != "ok":
            assert time.monotonic() < deadline, "replica 1 did not come back within 60 s"
            time.sleep(0.2)
        back = time.monotonic() - t
        served = _metric(base, "tensorpar_replica_requests_total", "1")
        again = Streams(base, model, prompts[:4], LONG)  # at once: the least busy replica takes each
        again.join(0.0)
        assert again.text == solo[:4]
        assert _metric(base, "tensorpar_replica_requests_total", "1") > served  # it serves again
        _no_block_held(base, "01")
        group = psutil.Process(proc.pid).children(recursive=True)
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    _nothing_left(group + list(first.values()), before)
    record(fault="SIGKILL of replica 1's leader while 8 streams run", command="serve", layout="tp=1 x dp=2",
           sees=f"8 streams complete, text unchanged; /health degraded until replica 1 is back, after {back:.1f} s",
           seconds=round(seconds, 1), lost="nothing (replica 1's requests resume on replica 0)")
