"""The HTTP surface under abuse, on one real server (tp=2): a bounded fuzz of the OpenAI endpoints
generated from the app's own OpenAPI schema (schemathesis), an oversized body, a slow client,
clients that vanish mid-stream, and 64 concurrent streams of which a random half abort. Every
response is an OpenAI-format success or 4xx, never a 5xx; afterwards every KV-cache block is
free, the processes' memory is back near idle, and a greedy request answers exactly as before."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import threading
import time

import httpx
import psutil
import pytest
from faultkit import finish, served_port, start

MAX_NUM_SEQS = 8
GREEDY = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def server(tiny_chat_checkpoint):
    """(base URL, the server process, its stderr lines so far) of a server bounding each request to
    16 tokens, 2 choices and 64 KiB."""
    proc, banner = start("serve", "--model", str(tiny_chat_checkpoint), "--tp", "2", "--port", "0",
                         "--max-num-seqs", str(MAX_NUM_SEQS), "--max-tokens-limit", "16", "--max-n", "2",
                         "--max-request-bytes", "65536", until="serving")
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # keep its pipe drained
    url = f"http://127.0.0.1:{served_port(banner)}"
    solo = httpx.post(f"{url}/v1/completions", json=GREEDY, timeout=60).json()["choices"][0]["text"]
    yield url, proc, lines, solo
    proc.send_signal(signal.SIGINT)
    finish(proc, 60)


def _openai_shaped(status: int, content_type: str, text: str) -> None:
    """A success (JSON with ``object``, server-sent events, /health, /metrics, /tokenize,
    /detokenize, /version, /tokenizer_info, /load, an empty /ping) or a 4xx with OpenAI's error object."""
    assert status < 500, (status, text[:500])
    if status >= 400:
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], text
    elif content_type.startswith("text/event-stream"):
        assert text.rstrip().endswith("data: [DONE]"), text[-300:]
    elif content_type.startswith("application/json"):
        body = json.loads(text)
        shapes = ({"object"}, {"status"}, {"count", "max_model_len", "tokens"}, {"prompt"}, {"version"},
                  {"tokenizer_class"}, {"server_load"})
        assert isinstance(body, dict) and any(keys <= set(body) for keys in shapes), text[:300]


def _gauges(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {m[0]: float(m[1]) for m in re.findall(r'^(tensorpar_\w+)\{replica="0"\} (\S+)$', text, re.M)}


def _idle(url: str, timeout_s: float = 30) -> dict:
    """Wait until nothing runs or waits and no KV-cache block is owned; the gauges then."""
    deadline = time.monotonic() + timeout_s
    while True:
        g = _gauges(url)
        if (g["tensorpar_num_requests_running"], g["tensorpar_num_requests_waiting"],
                g["tensorpar_kv_cache_usage_ratio"]) == (0, 0, 0):
            return g
        assert time.monotonic() < deadline, f"the engine never went idle: {g}"
        time.sleep(0.1)


def _rss_mb(proc) -> list[float]:
    root = psutil.Process(proc.pid)
    return [p.memory_info().rss / 2**20 for p in [root, *root.children()]]


def test_a_fuzz_generated_from_the_openapi_schema_gets_no_5xx(server, record):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    url, proc, lines, _ = server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: dict[int, int] = {}
    t = time.monotonic()
    for operation in (result.ok() for result in schema.get_all_operations()):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                r = case.call(base_url=url, timeout=30)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                content_type = r.headers.get("content-type") or r.headers.get("Content-Type") or [""]
                _openai_shaped(r.status_code, content_type[0] if isinstance(content_type, list) else content_type, r.text)

            try:
                fuzz()
            except Unsatisfiable:  # a route whose schema no input can break (no body, any string as a name)
                assert mode == GenerationMode.NEGATIVE and not operation.body
    seconds = time.monotonic() - t
    assert statuses.get(200) and sum(n for s, n in statuses.items() if 400 <= s < 500) > 50, statuses
    _idle(url)
    assert proc.poll() is None and not any("Traceback" in ln or "ERROR" in ln for ln in lines), lines[-20:]
    seen = ", ".join(f"{n} x {s}" for s, n in sorted(statuses.items()))
    record(fault=f"{sum(statuses.values())} requests fuzzed from the OpenAPI schema (valid and invalid bodies)",
           command="serve", layout="tp=2", sees=f"OpenAI-format responses only: {seen}", seconds=round(seconds, 1),
           lost="nothing (no 5xx; every KV block free afterwards)")


def test_an_oversized_body_a_slow_client_and_vanishing_clients(server, record):
    url, proc, _, solo = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 100_000, "max_tokens": 1}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(GREEDY).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    t = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as slow:
        slow.sendall(head)
        for i in range(0, len(body), 8):  # a byte trickle over ~2 s, while others are served
            slow.sendall(body[i:i + 8])
            if i == 16:
                assert httpx.post(f"{url}/v1/completions", json=GREEDY, timeout=30).json()["choices"][0]["text"] == solo
            time.sleep(0.25)
        reply = b""
        while chunk := slow.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and json.loads(reply.split(b"\r\n\r\n", 1)[1])["choices"][0]["text"] == solo
    slow_s = time.monotonic() - t

    for _ in range(4):  # read two events of a stream, then hang up
        with httpx.stream("POST", f"{url}/v1/completions", json={**GREEDY, "stream": True, "max_tokens": 16},
                          timeout=30) as s:
            events = 0
            for ln in s.iter_lines():
                events += ln.startswith("data: ")
                if events == 2:
                    break
    _idle(url)
    record(fault="a 100 kB body (limit 64 KiB), a client trickling its body over 2 s, 4 clients hanging up "
                 "mid-stream", command="serve", layout="tp=2",
           sees="413 request_too_large; the slow client gets its answer while others are served; the streams' "
                "KV blocks are freed", seconds=round(slow_s, 1), lost="nothing")


def test_64_concurrent_streams_with_random_aborts_leave_nothing_behind(server, record):
    url, proc, _, solo = server
    _idle(url)
    idle_rss = _rss_mb(proc)
    rng = random.Random(0)
    plan = [None if rng.random() < 0.5 else rng.choice([0, 1, 3]) for _ in range(64)]  # None: read to the end;
    # k: hang up after k events

    async def one(client, i, abort_after):
        body = {"prompt": f"Story {i}:", "max_tokens": 16, "stream": True, "temperature": 0.8, "seed": i,
                **({"n": 2} if i % 8 == 0 else {})}
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if abort_after is not None and len(events) > abort_after:
                        return "aborted"
            assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
            return "done"

    async def storm():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(one(client, i, k) for i, k in enumerate(plan)))

    t = time.monotonic()
    outcomes = asyncio.run(storm())
    seconds = time.monotonic() - t
    assert outcomes.count("done") == plan.count(None) and outcomes.count("aborted") == 64 - plan.count(None)
    _idle(url)
    grown = [after - before for before, after in zip(idle_rss, _rss_mb(proc))]
    assert max(grown) < 64, (idle_rss, grown)  # MiB per process: no KV or request state kept
    again = httpx.post(f"{url}/v1/completions", json=GREEDY, timeout=30).json()["choices"][0]["text"]
    assert again == solo
    record(fault=f"64 concurrent streams, {64 - plan.count(None)} of them hung up at random", command="serve",
           layout="tp=2", sees=f"{plan.count(None)} streams complete, every KV block free afterwards, RSS within "
                               f"{max(grown):.0f} MiB of idle, the solo greedy answer unchanged",
           seconds=round(seconds, 1), lost="nothing (only the aborted streams' own tokens)")
