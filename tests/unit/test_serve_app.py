"""The OpenAI-compatible HTTP layer (``tensorpar.serve``) against a fake engine.

``FakeEngine`` implements the ``ServingBackend`` protocol on its own thread: it "generates" a
fixed script of real SmolLM2 tokens (shifted by the seed), honours stop strings, max tokens,
aborts and a queue of ``max_num_seqs``, and can turn unhealthy (all in-flight requests then end
with an error event, as when a rank dies).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tensorpar.runtime.inputs import InputProcessor
from tensorpar.runtime.request import TokenEvent
from tensorpar.serve import create_app, run_server

SCRIPT = " the quick brown fox jumps over the lazy dog and runs far away into the hills."
MODEL = "fake-smollm2"


class FakeEngine:
    """A ``ServingBackend``, generating deterministic tokens on a loop thread."""

    def __init__(self, tokenizer, max_model_len: int = 256, max_num_seqs: int = 4, delay_s: float = 0.001,
                 fail_after_tokens: int | None = None):
        self.tokenizer, self.model_name, self.tp, self.layout = tokenizer, MODEL, 2, "tp=2"
        self.max_model_len, self.max_num_seqs, self.delay_s = max_model_len, max_num_seqs, delay_s
        self.inputs = InputProcessor(tokenizer, len(tokenizer), max_model_len)
        self.fail_after_tokens = fail_after_tokens  # turn unhealthy after this many tokens in all
        self.script = tokenizer(SCRIPT)["input_ids"]
        self.lock = threading.Lock()
        self.waiting: deque = deque()
        self.running: dict[str, dict] = {}
        self.submitted, self.aborted, self.to_abort = [], [], set()
        self.error: str | None = None
        self.emitted = 0
        self.stats_extra: dict = {}  # more of ``stats()`` (the KV-cache figures a real engine reports)
        self.sampling_defaults: dict = {}  # (``--generation-config``)
        self.shutdown_calls = 0
        self.refuse = False  # submit raises
        self.stopping = False  # submit answers at once with an error event (as while shutting down)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    # ---- the interface -----------------------------------------------------------------------
    def submit(self, req, callback) -> None:
        if self.refuse:
            raise RuntimeError("the engine is shutting down")
        if self.stopping:
            callback(TokenEvent(req.request_id, None, "", finished=True, finish_reason="error",
                                error="the server is shutting down"))
            return
        with self.lock:
            self.submitted.append(req)
            self.waiting.append({"req": req, "cb": callback, "ids": [], "text": ""})

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.aborted.append(request_id)
            self.to_abort.add(request_id)

    def stats(self) -> dict:
        with self.lock:
            return {"running": len(self.running), "waiting": len(self.waiting),
                    "kv_cache_usage": len(self.running) / self.max_num_seqs, "healthy": self.error is None,
                    "error": self.error, **self.stats_extra}

    def shutdown(self) -> None:
        self.shutdown_calls += 1
        self._stop.set()
        self.thread.join(timeout=5)

    # ---- test controls -----------------------------------------------------------------------
    def fail(self, message: str = "rank 1 died (exit code -9)") -> None:
        with self.lock:
            self.error = message

    def submitted_ids(self) -> list[str]:
        with self.lock:
            return [r.request_id for r in self.submitted]

    # ---- the loop ----------------------------------------------------------------------------
    def _step(self, s: dict) -> TokenEvent:
        req, k = s["req"], len(s["ids"])
        tid = self.script[(k + (req.params.seed or 0)) % len(self.script)]
        s["ids"].append(tid)
        old = s["text"]
        s["text"] = self.tokenizer.decode(s["ids"])
        delta, reason = s["text"][len(old):], None
        hits = [s["text"].find(x) for x in req.params.stop if x in s["text"]]
        if hits:
            delta, reason = s["text"][len(old):max(min(hits), len(old))], "stop"
        elif len(s["ids"]) >= req.params.max_new_tokens:
            reason = "length"
        lp = -0.1 * (k % 5 + 1)
        top = [(tid, lp)] + [((tid + j) % len(self.tokenizer), lp - j) for j in range(1, req.params.logprobs)]
        return TokenEvent(req.request_id, tid, delta, lp, top[: req.params.logprobs], reason is not None, reason,
                          admitted_at=time.perf_counter() if k == 0 else None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            out = []
            with self.lock:
                if self.error is not None:
                    for s in [*self.running.values(), *self.waiting]:
                        out.append((s["cb"], TokenEvent(s["req"].request_id, None, "", finished=True,
                                                        finish_reason="error", error=self.error)))
                    self.running.clear()
                    self.waiting.clear()
                while self.waiting and len(self.running) < self.max_num_seqs:
                    s = self.waiting.popleft()
                    self.running[s["req"].request_id] = s
                for rid, s in list(self.running.items()):
                    if rid in self.to_abort:
                        ev = TokenEvent(rid, None, "", finished=True, finish_reason="abort")
                    else:
                        ev = self._step(s)
                        self.emitted += 1
                        if self.fail_after_tokens is not None and self.emitted >= self.fail_after_tokens:
                            self.error = "rank 1 died (exit code -9)"
                    if ev.finished:
                        del self.running[rid]
                    out.append((s["cb"], ev))
                self.waiting = deque(s for s in self.waiting if s["req"].request_id not in self.to_abort)
            for cb, ev in out:
                cb(ev)
            time.sleep(self.delay_s)
        with self.lock:
            for s in [*self.running.values(), *self.waiting]:
                s["cb"](TokenEvent(s["req"].request_id, None, "", finished=True, finish_reason="abort"))
            self.running.clear()
            self.waiting.clear()


# ---- fixtures and helpers ----------------------------------------------------------------------

@pytest.fixture
def engine(tokenizer):
    e = FakeEngine(tokenizer)
    yield e
    e.shutdown()


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine)) as c:
        yield c


def sse(text: str) -> list[dict]:
    """The JSON chunks of an event stream, checking its framing and the final [DONE]."""
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    assert all(b.startswith("data: ") for b in blocks), blocks
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(b[len("data: "):]) for b in blocks[:-1]]


def expected_text(tokenizer, n: int, seed: int = 0) -> str:
    ids = tokenizer(SCRIPT)["input_ids"]
    return tokenizer.decode([ids[(k + seed) % len(ids)] for k in range(n)])


def assert_error(r, status: int, param=..., code=...):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not ...:
        assert err["param"] == param
    if code is not ...:
        assert err["code"] == code
    return err


def chat_ids(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


# ---- endpoints ---------------------------------------------------------------------------------

def test_models(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model" and body["data"][0]["max_model_len"] == 256
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert_error(client.get("/v1/models/other"), 404, code="model_not_found")


def test_completion(client, engine, tokenizer):
    prompt = "Once upon a time"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == MODEL
    [choice] = body["choices"]
    assert choice == {"index": 0, "text": expected_text(tokenizer, 16), "logprobs": None, "finish_reason": "length",
                      "prompt_logprobs": None}
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 16, "total_tokens": n_prompt + 16}
    [req] = engine.submitted
    assert req.request_id == f"{body['id']}-0" and req.prompt_token_ids == tokenizer(prompt)["input_ids"]
    assert req.params.max_new_tokens == 16 and req.params.temperature == 1.0 and req.params.seed is None
    assert req.params.logprobs == 0


def test_completion_prompt_forms(client, engine, tokenizer):
    ids = tokenizer("Hello there")["input_ids"]
    for prompt in (ids, ["Hello there"], [ids]):
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert [r.prompt_token_ids for r in engine.submitted] == [ids] * 3
    r = client.post("/v1/completions", json={"prompt": [ids, ids[:1]], "n": 2, "max_tokens": 2})
    assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert [r.prompt_token_ids for r in engine.submitted[3:]] == [ids, ids, ids[:1], ids[:1]]  # prompt-major
    assert r.json()["usage"]["prompt_tokens"] == len(ids) + 1
    r = client.post("/v1/completions", json={"prompt": ["Hello there", "Hi"], "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_sampling_parameters_pass_through(client, engine):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "temperature": 0, "top_p": 0.5,
                                             "seed": 3, "stop": "xyz", "top_k": 7, "ignore_eos": True})
    assert r.status_code == 200, r.text
    p = engine.submitted[-1].params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.seed, p.stop, p.top_k, p.ignore_eos) == \
        (5, 0.0, 0.5, 3, ("xyz",), 7, True)
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                              "stop": ["a", "b"], "temperature": 0.7, "top_p": 0})
    p = engine.submitted[-1].params
    assert p.stop == ("a", "b") and p.greedy  # top_p 0: only the likeliest token


def test_stop_is_the_engines_job(client, engine, tokenizer):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 20, "stop": ["fox"]}).json()
    assert engine.submitted[-1].params.stop == ("fox",)
    assert r["choices"][0]["text"] == " the quick brown " and r["choices"][0]["finish_reason"] == "stop"


def test_completion_stream(client, tokenizer):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 6, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r.text)
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    assert all(set(c) == {"id", "object", "created", "model", "system_fingerprint", "choices"} for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected_text(tokenizer, 6)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_stream_include_usage(client):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True,
                                             "stream_options": {"include_usage": True}})
    chunks = sse(r.text)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_chat(client, engine, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected_text(tokenizer, 5), "refusal": None}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    ids = chat_ids(tokenizer, messages)
    assert engine.submitted[-1].prompt_token_ids == ids
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 5, "total_tokens": len(ids) + 5}
    # content given as text parts is the same prompt
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, messages[1]]
    client.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 1})
    assert engine.submitted[-1].prompt_token_ids == ids


def test_chat_default_max_tokens_fills_the_context(client, engine, tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    client.post("/v1/chat/completions", json={"messages": messages, "stop": "."})
    assert engine.submitted[-1].params.max_new_tokens == 256 - len(chat_ids(tokenizer, messages))
    client.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 3})
    assert engine.submitted[-1].params.max_new_tokens == 3


def test_chat_stream(client, tokenizer):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 4, "stream": True})
    chunks = sse(r.text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all(set(d) == {"content"} for d in deltas[1:])
    assert "".join(d["content"] for d in deltas[1:]) == expected_text(tokenizer, 4)
    # the finish reason on the chunk with the last text, as vLLM sends it
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert deltas[-1]["content"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                                  "stream_options": {"include_usage": True}})
    assert_error(r, 400, param="stream_options")  # (only with stream)
    chunks = sse(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                           "max_tokens": 3, "stream": True, "stream_options": {
                                                               "include_usage": True, "continuous_usage_stats": True}}).text)
    assert [c["usage"]["completion_tokens"] for c in chunks[1:-1]] == [1, 2, 3]  # the usage so far on every chunk
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_n_choices(client, engine, tokenizer):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "n": 2, "seed": 7}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert [c["text"] for c in r["choices"]] == [expected_text(tokenizer, 3, 7), expected_text(tokenizer, 3, 8)]
    assert [q.request_id for q in engine.submitted] == [f"{r['id']}-0", f"{r['id']}-1"]
    assert [q.params.seed for q in engine.submitted] == [7, 8]
    assert r["usage"]["completion_tokens"] == 6
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 3, "n": 2, "stream": True})
    chunks = sse(r.text)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] == "length"
    assert [q.params.seed for q in engine.submitted[2:]] == [None, None]


def test_completion_logprobs(client, engine, tokenizer):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "logprobs": 3}).json()
    assert engine.submitted[-1].params.logprobs == 3
    lp = r["choices"][0]["logprobs"]
    script = tokenizer(SCRIPT)["input_ids"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in script[:4]]
    assert lp["token_logprobs"] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert all(len(d) == 3 for d in lp["top_logprobs"])
    assert lp["text_offset"] == [0, *[len("".join(lp["tokens"][:k])) for k in range(1, 4)]]
    chunks = sse(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "logprobs": 1,
                                                      "stream": True}).text)
    assert [c["choices"][0]["logprobs"]["tokens"] for c in chunks] == [[lp["tokens"][0]], [lp["tokens"][1]]]
    alone = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "logprobs": 0}).json()
    alone = alone["choices"][0]["logprobs"]
    assert alone["top_logprobs"] == [{t: v} for t, v in zip(alone["tokens"], alone["token_logprobs"])]  # as vLLM


def test_chat_logprobs(client, engine, tokenizer):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    r = client.post("/v1/chat/completions", json=body).json()
    assert engine.submitted[-1].params.logprobs == 2
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    first = content[0]
    token = tokenizer.decode([tokenizer(SCRIPT)["input_ids"][0]])
    assert first["token"] == token and first["bytes"] == list(token.encode()) and first["logprob"] == pytest.approx(-0.1)
    assert [e["token"] for e in first["top_logprobs"]][0] == token and len(first["top_logprobs"]) == 2
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    streamed = [c["choices"][0]["logprobs"]["content"][0]["token"] for c in chunks[1:]]
    assert streamed == [e["token"] for e in content]
    r = client.post("/v1/chat/completions", json={**body, "top_logprobs": None}).json()
    assert r["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    assert engine.submitted[-1].params.logprobs == 0


# ---- errors ------------------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}
ERRORS = [
    ("/v1/completions", {"prompt": "Hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", ...),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": "many"}, 400, "max_tokens", ...),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", ...),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": -5}, 400, "max_tokens", ...),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens", ...),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 300}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": list(range(1, 260))}, 400, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 300}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", ...),
    ("/v1/completions", {"prompt": []}, 400, "prompt", ...),
    ("/v1/completions", {"prompt": [5, 10**9]}, 400, "prompt", ...),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, 400, "n", ...),
    ("/v1/completions", {"prompt": "Hi", "n": 1000}, 400, "n", ...),
    ("/v1/completions", {"prompt": "Hi", "temperature": 5}, 400, "temperature", ...),
    ("/v1/completions", {"prompt": "Hi", "top_p": 1.5}, 400, "top_p", ...),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 100}, 400, "logprobs", ...),
    ("/v1/completions", {"prompt": "Hi", "best_of": 2}, 400, "best_of", ...),
    ("/v1/completions", {"prompt": "Hi", "echo": True, "max_tokens": -1}, 400, "max_tokens", ...),
    ("/v1/completions", {"prompt": ["Hi"] * 300}, 400, "prompt", ...),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", ...),
    ("/v1/chat/completions", {"messages": "Hi"}, 400, "messages", ...),
    ("/v1/chat/completions", {"messages": [{"content": "Hi"}]}, 400, "messages.0.role", ...),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", ...),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs", ...),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", ...),
]


@pytest.mark.parametrize("path,body,status,param,code", ERRORS)
def test_errors(client, engine, path, body, status, param, code):
    assert_error(client.post(path, json=body), status, param, code)
    assert engine.submitted == []
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})  # still serving
    assert r.status_code == 200


def test_context_length_message_gives_the_numbers(client, tokenizer):
    err = assert_error(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 300}), 400)
    n = len(tokenizer("Hi")["input_ids"])
    assert "256" in err["message"] and f"{300 + n}" in err["message"] and f"{n} in the prompt" in err["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b'{"prompt": "Hi",}'])
def test_malformed_json(client, raw):
    err = assert_error(client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}),
                       400)
    assert err["type"] == "invalid_request_error"


def test_content_type(client):
    body = json.dumps({"prompt": "Hi", "max_tokens": 1})
    assert client.post("/v1/completions", content=body).status_code == 200  # none given: JSON assumed
    err = assert_error(client.post("/v1/completions", content=body,  # curl -d without -H
                                   headers={"content-type": "application/x-www-form-urlencoded"}), 400)
    assert "application/json" in err["message"]


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_api_key(engine):
    with TestClient(create_app(engine, api_key="sekret")) as c:
        body = {"prompt": "Hi", "max_tokens": 1}
        assert_error(c.post("/v1/completions", json=body), 401, code="invalid_api_key")
        assert_error(c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "sekret"}), 401)
        assert_error(c.post("/v1/completions", json={"bad": 1}), 401)  # auth before validation
        ok = {"Authorization": "Bearer sekret"}
        assert c.post("/v1/completions", json=body, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_no_api_key_needed_when_unset(client):
    assert client.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


# ---- health, metrics, failures -----------------------------------------------------------------

def test_health_and_unhealthy_engine(client, engine):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    engine.fail("rank 1 died (exit code -9)")
    r = client.get("/health")
    assert r.status_code == 503 and "rank 1" in r.json()["error"]
    err = assert_error(client.post("/v1/completions", json={"prompt": "Hi"}), 503)
    assert "rank 1" in err["message"] and err["type"] == "server_error"
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "stream": True}), 503)
    assert engine.submitted == []


def test_engine_dies_mid_request(tokenizer):
    e = FakeEngine(tokenizer, fail_after_tokens=3)
    try:
        with TestClient(create_app(e)) as c:
            err = assert_error(c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 50}), 503)
            assert "rank 1" in err["message"]
            e.error, e.emitted = None, 0
            r = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 50, "stream": True})
            blocks = r.text.split("\n\n")
            assert blocks[-2:] == ["data: [DONE]", ""]
            last = json.loads(blocks[-3][len("data: "):])
            assert "rank 1" in last["error"]["message"]
    finally:
        e.shutdown()


def test_engine_refuses_submit(client, engine):
    engine.refuse = True
    err = assert_error(client.post("/v1/completions", json={"prompt": "Hi", "n": 2}), 503)
    assert "shutting down" in err["message"]
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    blocks = r.text.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""] and "shutting down" in json.loads(blocks[0][6:])["error"]["message"]
    engine.refuse, engine.stopping = False, True
    err = assert_error(client.post("/v1/completions", json={"prompt": "Hi", "n": 2}), 503)
    assert "shutting down" in err["message"]


def test_metrics(client, engine):
    engine.stats_extra = {"block_size": 16, "prefix_caching": True, "kv_blocks": 100,
                          "step_tokens": {"counts": [1, 2] + [0] * 12, "sum": 20, "count": 3}}
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
    client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "stream": True})
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 0})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in (
        'tensorpar_requests_total{endpoint="/v1/completions",status="200"} 1.0',
        'tensorpar_requests_total{endpoint="/v1/completions",status="400"} 1.0',
        'tensorpar_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0',
        "tensorpar_generation_tokens_total 5.0",
        "tensorpar_time_to_first_token_seconds_count 2.0",
        "tensorpar_inter_token_latency_seconds_count 3.0",
        "tensorpar_e2e_request_latency_seconds_count 2.0",
        'tensorpar_num_requests_running{replica="0"} 0.0',
        'tensorpar_num_requests_waiting{replica="0"} 0.0',
        'tensorpar_kv_cache_usage_ratio{replica="0"} 0.0',
        'tensorpar_replica_healthy{replica="0"} 1.0',
        "tensorpar_engine_healthy 1.0",
    ):
        assert line in text, line
    assert "tensorpar_prompt_tokens_total" in text
    model = f'{{model_name="{MODEL}"}}'
    for line in (f"vllm:request_generation_tokens_sum{model} 5.0", f"vllm:request_generation_tokens_count{model} 2.0",
                 f"vllm:request_params_max_tokens_sum{model} 5.0", f"vllm:request_params_n_count{model} 2.0",
                 f"vllm:request_queue_time_seconds_count{model} 2.0", f"vllm:request_decode_time_seconds_count{model} 2.0",
                 f'vllm:request_prompt_tokens_bucket{{le="1.0",model_name="{MODEL}"}} 1.0',  # ("Hi": one token)
                 f'vllm:cache_config_info{{block_size="16",enable_prefix_caching="True",model_name="{MODEL}",'
                 f'num_gpu_blocks="100"}} 1.0',
                 f'vllm:iteration_tokens_total_bucket{{le="8.0",model_name="{MODEL}"}} 3.0',
                 f"vllm:iteration_tokens_total_sum{model} 20.0"):
        assert line in text, line


def test_queue_beyond_max_num_seqs(client, engine):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "n": 9}).json()
    assert len(r["choices"]) == 9 and all(c["finish_reason"] == "length" for c in r["choices"])


def test_disconnect_mid_stream_in_app_aborts(engine, tokenizer):
    engine.delay_s = 0.02
    with TestClient(create_app(engine)) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 200, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    rid = engine.submitted[0].request_id
    deadline = time.time() + 5
    while rid not in engine.aborted and time.time() < deadline:
        time.sleep(0.02)
    assert rid in engine.aborted


# ---- the real server ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(engine, api_key=None):
    port, stop = free_port(), threading.Event()
    t = threading.Thread(target=run_server, args=(engine, "127.0.0.1", port, api_key), kwargs={"stop": stop},
                         daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 20
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline and t.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield url
    finally:
        stop.set()
        t.join(timeout=15)
        assert not t.is_alive()


def wait_aborted(engine, rid: str, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while rid not in engine.aborted and time.time() < deadline:
        time.sleep(0.02)
    return rid in engine.aborted


def test_openai_client_against_server(engine, tokenizer, capsys):
    import openai

    with live_server(engine, api_key="k1") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k1", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]
        c = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, temperature=0)
        assert c.choices[0].text == expected_text(tokenizer, 5) and c.usage.completion_tokens == 5
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, n=2, seed=1, logprobs=True, top_logprobs=2)
        assert chat.choices[1].message.content == expected_text(tokenizer, 4, 2)
        assert len(chat.choices[0].logprobs.content) == 4 and chat.choices[0].finish_reason == "length"
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=6, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == expected_text(tokenizer, 6) and chunks[-1].usage.completion_tokens == 6
        text = "".join(ch.choices[0].text for ch in client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=3, stream=True))
        assert text == expected_text(tokenizer, 3)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4", prompt="Hi")
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=10_000)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).models.list()
        port = url.rsplit(":", 1)[1]
    assert engine.shutdown_calls == 1
    assert f"tensorpar: serving {MODEL} at http://127.0.0.1:{port} (tp=2)" in capsys.readouterr().err


def test_disconnects_abort_on_real_server(engine):
    engine.delay_s = 0.02
    with live_server(engine) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions",
                          json={**CHAT, "max_tokens": 200, "stream": True}, timeout=10) as r:
            assert next(r.iter_lines()).startswith("data: ")
        assert wait_aborted(engine, engine.submitted_ids()[0])
        with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
            httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 200}, timeout=0.3)
        assert wait_aborted(engine, engine.submitted_ids()[1])
        assert httpx.get(f"{url}/health").status_code == 200


SIGTERM_SCRIPT = r"""
import sys, threading
from tensorpar.runtime.inputs import InputProcessor
from tensorpar.runtime.request import TokenEvent
from tensorpar.serve import run_server

class Tok:
    def __len__(self): return 100
    def __call__(self, text): return {"input_ids": [1] * len(text.split())}
    def decode(self, ids, **kw): return "".join("x" for _ in ids)

class Engine:
    tokenizer, model_name, max_model_len, max_num_seqs, tp, layout = Tok(), "m", 64, 2, 1, "tp=1"
    inputs = InputProcessor(tokenizer, 100, max_model_len)
    def submit(self, req, cb):  # a slow request: one token in 1.5 s
        print("submitted", flush=True)
        threading.Timer(1.5, cb, [TokenEvent(req.request_id, 5, "x", finished=True, finish_reason="length")]).start()
    def abort(self, rid): pass
    def stats(self): return {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "healthy": True, "error": None}
    def shutdown(self): print("engine shutdown", flush=True)

run_server(Engine(), "127.0.0.1", int(sys.argv[1]), None, grace_s=5)
print("returned", flush=True)
"""


def test_sigterm_drains_then_shuts_down(tmp_path):
    script = tmp_path / "serve.py"
    script.write_text(SIGTERM_SCRIPT)
    port = free_port()
    p = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")})
    try:
        assert "tensorpar: serving m at" in p.stderr.readline()
        result = {}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(
            f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "a b", "max_tokens": 1}, timeout=10)))
        t.start()
        assert p.stdout.readline() == "submitted\n"  # the request is in flight
        p.send_signal(signal.SIGTERM)
        t.join(timeout=10)
        assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"] == "x"
        out, err = p.communicate(timeout=15)
        assert p.returncode == 0, err
        assert out.splitlines() == ["engine shutdown", "returned"]  # after the request was answered
    finally:
        if p.poll() is None:
            p.kill()


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_parsed(engine):
    with TestClient(create_app(engine, max_request_bytes=2000)) as c:
        big = {"model": "m", "prompt": "x" * 5000, "max_tokens": 1}
        r = c.post("/v1/completions", json=big)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large" and "2000 bytes" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"model": "m", "prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        r = c.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1})
        assert r.status_code != 413  # a small one goes through, on the same server


def test_the_servers_bounds_on_n_and_max_tokens(engine):
    from tensorpar.serve.params import Limits

    with TestClient(create_app(engine, limits=Limits(max_n=2, max_tokens=3))) as c:
        r = c.post("/v1/completions", json={"prompt": "Hi", "n": 3, "max_tokens": 1})
        assert_error(r, 400, param="n")
        assert r.json()["error"]["message"] == "n must be between 1 and 2, got 3"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert_error(r, 400, param="max_tokens")
        assert "at most 3 tokens" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "n": 2})
        assert r.status_code == 200 and [ch["finish_reason"] for ch in r.json()["choices"]] == ["length", "length"]
        assert r.json()["usage"]["completion_tokens"] == 6  # no max_tokens: the server's bound, per choice


def test_the_model_name_is_matched_never_opened_as_a_path(client):
    for name in ("../../etc/passwd", "/etc/passwd", MODEL + "/../x"):
        r = client.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 1})
        assert_error(r, 404, param="model", code="model_not_found")
        assert_error(client.get(f"/v1/models/{name}"), 404)


def test_echo_puts_the_prompt_before_the_completion(client):
    plain = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).json()["choices"][0]["text"]
    echoed = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "echo": True}).json()
    assert echoed["choices"][0]["text"] == "Hi" + plain
    events = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "echo": True, "stream": True})
    chunks = [json.loads(ln[6:]) for ln in events.text.splitlines() if ln.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"] == "Hi" and "".join(c["choices"][0]["text"] for c in chunks) == "Hi" + plain


def test_sampling_controls_pass_through_and_unsupported_fields_are_refused(client, engine):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "presence_penalty": 0.5,
                                             "frequency_penalty": -0.5, "repetition_penalty": 1.2, "min_p": 0.1,
                                             "logit_bias": {"42": 3.5}, "stop_token_ids": [7, 9], "min_tokens": 2})
    assert r.status_code == 200, r.text
    p = engine.submitted[-1].params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (0.5, -0.5, 1.2, 0.1)
    assert p.logit_bias == ((42, 3.5),) and p.stop_token_ids == (7, 9) and p.min_tokens == 2
    defaults = {"response_format": {"type": "text"}, "tool_choice": "none", "tools": [], "user": "me", "store": False}
    assert client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1, **defaults}).status_code == 200
    for path, extra in [("/v1/chat/completions", {"functions": [{"name": "f"}]}),
                        ("/v1/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
                        ("/v1/completions", {"suffix": "end"})]:
        body = {**(CHAT if "chat" in path else {"prompt": "Hi"}), **extra}
        err = assert_error(client.post(path, json=body), 400, param=next(iter(extra)))
        assert "not supported" in err["message"]
    for bad in ({"logit_bias": {"x": 1}}, {"logit_bias": {"5": 500}}, {"logit_bias": {str(10**9): 1}}):
        assert_error(client.post("/v1/completions", json={"prompt": "Hi", **bad}), 400, param="logit_bias")
    assert_error(client.post("/v1/completions", json={"prompt": "Hi", "presence_penalty": 9}), 400,
                 param="presence_penalty")


def test_tokenize_detokenize_version_and_served_names(engine, tokenizer):
    from tensorpar import __version__

    with TestClient(create_app(engine, served_names=["smol", "smol-alias"])) as c:
        ids = tokenizer("Hello there")["input_ids"]
        assert c.post("/tokenize", json={"prompt": "Hello there"}).json() == {"count": len(ids), "max_model_len": 256,
                                                                              "tokens": ids}
        chat = c.post("/tokenize", json={"model": "smol-alias", "messages": [{"role": "user", "content": "Hi"}]}).json()
        assert chat["tokens"] == engine.inputs.encode_messages([{"role": "user", "content": "Hi"}])
        assert c.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello there"}
        assert_error(c.post("/detokenize", json={"tokens": [10**9]}), 400, param="tokens")
        assert_error(c.post("/tokenize", json={}), 400, param="prompt")
        assert c.get("/version").json() == {"version": __version__}
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["smol", "smol-alias"]
        r = c.post("/v1/completions", json={"model": "smol-alias", "prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == "smol"  # responses carry the first name
        err = assert_error(c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"}), 404, param="model")
        assert "'smol', 'smol-alias'" in err["message"]
    with TestClient(create_app(engine, api_key="k")) as c:
        assert c.post("/tokenize", json={"prompt": "Hi"}).status_code == 401 and c.get("/version").status_code == 200


# ---- structured output and tools ---------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL_TEXT = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture
def tools_engine(engine):
    """The fake engine with a tools-aware chat template (tensorpar's Hermes one)."""
    from tensorpar.serve.tools import HERMES_TEMPLATE

    engine.inputs.chat_template = HERMES_TEMPLATE.read_text()
    return engine


def test_structured_output_fields_become_the_requests_constraint(client, engine):
    from tensorpar.runtime.guided import GuidedDecoding as G

    as_schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    cases = [
        ("/v1/chat/completions", {"response_format": {"type": "text"}}, None),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, G("json_object")),
        ("/v1/chat/completions", {"response_format": as_schema}, G("json_schema", PERSON)),
        ("/v1/completions", {"response_format": as_schema}, G("json_schema", PERSON)),
        ("/v1/completions", {"guided_json": PERSON}, G("json_schema", PERSON)),
        ("/v1/completions", {"guided_json": json.dumps(PERSON)}, G("json_schema", PERSON)),
        ("/v1/completions", {"guided_regex": "[a-z]+ [0-9]"}, G("regex", "[a-z]+ [0-9]")),
        ("/v1/completions", {"guided_choice": ["yes", "no"]}, G("choice", ("yes", "no"))),
        ("/v1/chat/completions", {"guided_grammar": 'start: "a" | "b"'}, G("grammar", 'start: "a" | "b"')),
        ("/v1/chat/completions", {"structured_outputs": {"json": PERSON}}, G("json_schema", PERSON)),
        ("/v1/chat/completions", {"structured_outputs": {"choice": ["x", "y"]}}, G("choice", ("x", "y"))),
        ("/v1/chat/completions", {"structured_outputs": {"json_object": True}}, G("json_object")),
    ]
    for path, extra, want in cases:
        body = {**(CHAT if "chat" in path else {"prompt": "Hi"}), "max_tokens": 2, "n": 2, **extra}
        r = client.post(path, json=body)
        assert r.status_code == 200, (extra, r.text)
        assert [s.params.guided for s in engine.submitted[-2:]] == [want, want], extra


@pytest.mark.parametrize("path, extra, param, words", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}}, "response_format", "invalid JSON schema: Invalid type: objekt"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "needs json_schema.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type", "'json_schema'"),
    ("/v1/completions", {"guided_regex": "a(b"}, "guided_regex", 'invalid regex "a(b"'),
    ("/v1/completions", {"guided_json": "{oops"}, "guided_json", "not JSON"),
    ("/v1/completions", {"guided_choice": []}, "guided_choice", "invalid choice"),
    ("/v1/completions", {"guided_grammar": "start: nowhere"}, "guided_grammar", "unknown name"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ("/v1/completions", {"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex",
     "at most one constraint"),
])
def test_invalid_constraints_are_a_400_naming_the_field_before_anything_runs(client, engine, path, extra, param,
                                                                              words):
    body = {**(CHAT if "chat" in path else {"prompt": "Hi"}), **extra}
    err = assert_error(client.post(path, json=body), 400, param=param)
    assert words in err["message"] and "\n" not in err["message"]
    assert engine.submitted == []


def test_tools_need_a_template_that_renders_them(client, engine, tokenizer):
    err = assert_error(client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER]}), 400, param="tools")
    assert "does not support tools" in err["message"] and "--chat-template" in err["message"]
    r = client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 2})
    assert r.status_code == 200 and engine.submitted[-1].prompt_token_ids == chat_ids(tokenizer, CHAT["messages"])
    assert "tool_calls" not in r.json()["choices"][0]["message"]


def test_tools_reach_the_template_and_a_required_call_is_a_grammar(client, tools_engine, tokenizer):
    engine, template = tools_engine, tools_engine.inputs.chat_template
    body = {**CHAT, "tools": [WEATHER], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=body).status_code == 200  # "auto": offered, text free
    want = tokenizer.apply_chat_template(CHAT["messages"], tools=[WEATHER], chat_template=template,
                                         add_generation_prompt=True, tokenize=True, return_dict=False)
    assert engine.submitted[-1].prompt_token_ids == want and engine.submitted[-1].params.guided is None
    assert "<tools>" in tokenizer.decode(want) and '"name": "get_weather"' in tokenizer.decode(want)
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        assert client.post("/v1/chat/completions", json={**body, "tool_choice": tool_choice}).status_code == 200
        guided = engine.submitted[-1].params.guided
        assert guided.kind == "grammar" and '\\"get_weather\\"' in guided.value and "%json" in guided.value
    for extra, param in [({"tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
                         ({"tools": [], "tool_choice": "required"}, "tool_choice"),
                         ({"tools": [WEATHER, WEATHER]}, "tools"),
                         ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
                         ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice")]:
        assert_error(client.post("/v1/chat/completions", json={**body, **extra}), 400, param=param)


def test_a_tool_result_goes_back_to_the_model(client, tools_engine, tokenizer):
    messages = [CHAT["messages"][0],
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "tools": [WEATHER], "max_tokens": 2})
    assert r.status_code == 200, r.text
    prompt = tokenizer.decode(tools_engine.submitted[-1].prompt_token_ids)
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n21 C, sunny\n</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n') in prompt
    messages[1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    assert_error(client.post("/v1/chat/completions", json={"messages": messages, "tools": [WEATHER]}), 400,
                 param="messages")


def test_the_reply_carries_tool_calls(client, tools_engine, tokenizer):
    tools_engine.script = tokenizer(CALL_TEXT + " END")["input_ids"]
    body = {**CHAT, "tools": [WEATHER], "stop": ["END"], "max_tokens": 60}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert choice["message"]["content"] == "Let me check." and choice["finish_reason"] == "tool_calls"
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    [whole] = deltas[1:]  # held back, then sent whole, with the finish reason
    assert whole["content"] == "Let me check." and whole["tool_calls"][0]["index"] == 0
    assert whole["tool_calls"][0]["function"] == call["function"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# ---- every vLLM request field: served, neutral or refused (``serve.fields``) ----------------------

def _status(name: str, model) -> str | None:
    from tensorpar.serve.fields import NEUTRAL, REFUSED

    served = name in model.model_fields or any(f.alias == name for f in model.model_fields.values())
    return "served" if served else "neutral" if name in NEUTRAL else "refused" if name in REFUSED else None


def _changing(values: tuple):
    """A value of a refused field that its neutral ``values`` do not hold."""
    if not values:
        return 1
    v = values[0]
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, dict):
        return {"x": 1}
    if isinstance(v, list):
        return [{"type": "function", "function": {"name": "f"}}]
    return "required" if "none" in values else "x"


def test_every_vllm_field_is_served_neutral_or_refused_and_refused_ones_are_a_400(client):
    from tensorpar.serve.fields import NEUTRAL, REFUSED, VLLM_FIELDS
    from tensorpar.serve.protocol import ChatCompletionRequest, CompletionRequest

    assert not NEUTRAL & set(REFUSED)
    for route, model, base in (("completions", CompletionRequest, {"prompt": "Hi", "max_tokens": 2}),
                               ("chat", ChatCompletionRequest, {**CHAT, "max_tokens": 2})):
        statuses = {name: _status(name, model) for name in VLLM_FIELDS[route]}
        assert not [n for n, s in statuses.items() if s is None], route  # a field with no decision
        assert not [n for n, s in statuses.items() if s == "served" and n in NEUTRAL], route
        plain = client.post(f"/v1/{route.replace('chat', 'chat/completions')}", json=base).json()
        for name, status in statuses.items():
            path = f"/v1/{route.replace('chat', 'chat/completions')}"
            if status == "refused":
                assert_error(client.post(path, json={**base, name: _changing(REFUSED[name])}), 400, param=name)
                for neutral in REFUSED[name]:
                    assert client.post(path, json={**base, name: neutral}).status_code == 200, (route, name)
            elif status == "neutral":
                r = client.post(path, json={**base, name: "x" if name != "mm_processor_kwargs" else {}})
                assert r.status_code == 200, (route, name, r.text)
                assert r.json()["choices"] == plain["choices"]


def test_prompt_truncation_token_filters_and_stop_strings_reach_the_request(client, engine, tokenizer):
    body = {"prompt": "one two three four five", "max_tokens": 2, "truncate_prompt_tokens": 2,
            "allowed_token_ids": [5, 6, 7], "bad_words": ["fox"], "include_stop_str_in_output": True}
    assert client.post("/v1/completions", json=body).status_code == 200
    req = engine.submitted[-1]
    assert req.prompt_token_ids == tokenizer("one two three four five")["input_ids"][-2:]
    p = req.params
    assert p.allowed_token_ids == (5, 6, 7) and p.include_stop_str_in_output
    assert set(p.bad_words) == {tuple(tokenizer("fox")["input_ids"]), tuple(tokenizer(" fox")["input_ids"])}
    for bad, param in (({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
                       ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens")):
        assert_error(client.post("/v1/completions", json={"prompt": "Hi", **bad}), 400, param=param)


def test_chat_template_controls_and_echo(client, engine, tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "echo": True,
                                                  "add_generation_prompt": False, "continue_final_message": True})
    assert r.status_code == 200, r.text
    assert engine.submitted[-1].prompt_token_ids == tokenizer.apply_chat_template(
        messages, continue_final_message=True, tokenize=True, return_dict=False)
    assert r.json()["choices"][0]["message"]["content"] == "Hello, I" + expected_text(tokenizer, 3)
    chunks = sse(client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "echo": True,
                                                           "add_generation_prompt": False, "stream": True,
                                                           "continue_final_message": True}).text)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello, I" + expected_text(
        tokenizer, 3)
    assert client.post("/v1/chat/completions", json={**CHAT, "add_generation_prompt": False}).status_code == 200
    assert engine.submitted[-1].prompt_token_ids == tokenizer.apply_chat_template(
        CHAT["messages"], add_generation_prompt=False, tokenize=True, return_dict=False)
    template = "{% for m in messages %}[{{ m.content }}{{ greeting }}]{% endfor %}"
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "chat_template": template}), 400,
                 param="chat_template")
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "continue_final_message": True}), 400,
                 param="continue_final_message")
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": {"tools": []}}), 400,
                 param="chat_template_kwargs")
    with TestClient(create_app(engine, limits=params_limits(trust_chat_template=True))) as trusting:
        body = {**CHAT, "chat_template": template, "chat_template_kwargs": {"greeting": "!"}, "max_tokens": 1}
        assert trusting.post("/v1/chat/completions", json=body).status_code == 200
        assert tokenizer.decode(engine.submitted[-1].prompt_token_ids) == "[Hi!]"


def params_limits(**kw):
    from tensorpar.serve.params import Limits

    return Limits(**kw)


def test_return_token_ids_gives_the_prompt_and_generated_ids(client, tokenizer):
    """vLLM's ``return_token_ids``: per completion choice ``prompt_token_ids`` and ``token_ids``; in
    chat the prompt's at the top; streamed, the prompt's with the first chunk, each chunk's own."""
    ids = tokenizer("Hi there")["input_ids"]
    script = tokenizer(SCRIPT)["input_ids"][:3]
    r = client.post("/v1/completions", json={"prompt": "Hi there", "max_tokens": 3, "return_token_ids": True}).json()
    assert r["choices"][0]["prompt_token_ids"] == ids and r["choices"][0]["token_ids"] == script
    plain = client.post("/v1/completions", json={"prompt": "Hi there", "max_tokens": 3}).json()
    assert "token_ids" not in plain["choices"][0]
    chunks = sse(client.post("/v1/completions", json={"prompt": "Hi there", "max_tokens": 3, "stream": True,
                                                      "return_token_ids": True}).text)
    assert chunks[0]["choices"][0]["prompt_token_ids"] == ids
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == script
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "return_token_ids": True}).json()
    assert r["prompt_token_ids"] == chat_ids(tokenizer, CHAT["messages"]) and r["choices"][0]["token_ids"] == script
    chunks = sse(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3, "stream": True,
                                                           "return_token_ids": True}).text)
    assert chunks[0]["prompt_token_ids"] == chat_ids(tokenizer, CHAT["messages"])
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == script


def test_the_api_key_is_read_from_vllm_api_key_as_vllm_does(monkeypatch):
    from tensorpar.cli.serve import api_key

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert api_key(None) is None and api_key("given") == "given"
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert api_key(None) == "from-env" and api_key("given") == "given"


def test_tokenize_takes_vllms_controls_and_tokenizer_info_describes_the_tokenizer(client, tokenizer):
    ids = tokenizer("Hello there")["input_ids"]
    r = client.post("/tokenize", json={"prompt": "Hello there", "return_token_strs": True,
                                       "add_special_tokens": False}).json()
    assert r["tokens"] == ids and r["token_strs"] == tokenizer.convert_ids_to_tokens(ids)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    r = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False,
                                       "continue_final_message": True}).json()
    assert r["tokens"] == tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=True,
                                                        return_dict=False)
    r = client.post("/tokenize", json={"messages": messages[:1], "add_generation_prompt": False}).json()
    assert r["tokens"] == tokenizer.apply_chat_template(messages[:1], tokenize=True, return_dict=False)
    assert_error(client.post("/tokenize", json={"messages": messages[:1], "add_special_tokens": True}), 400,
                 param="add_special_tokens")
    info = client.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == type(tokenizer).__name__ and info["chat_template"] == tokenizer.chat_template


def test_model_cards_sagemaker_routes_and_the_seed_range_are_vllms(client, engine, tokenizer):
    card = client.get("/v1/models").json()["data"][0]
    assert card["root"] == MODEL and card["parent"] is None and card["permission"][0]["object"] == "model_permission"
    assert client.get("/ping").status_code == 200
    chat = client.post("/invocations", json={**CHAT, "max_tokens": 2}).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == expected_text(tokenizer, 2)
    assert client.post("/invocations", json={"prompt": "Hi", "max_tokens": 2}).json()["object"] == "text_completion"
    assert_error(client.post("/invocations", json={"input": "Hi"}), 400)
    assert_error(client.post("/v1/completions", json={"prompt": "Hi", "seed": 1 << 64}), 400, param="seed")
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": -1}), 400,
                 param="top_logprobs")
    engine.error = "rank 1 died"
    assert client.get("/ping").status_code == 503


def test_return_tokens_as_token_ids_names_logprob_entries_by_id(client, tokenizer):
    script = tokenizer(SCRIPT)["input_ids"]
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "logprobs": 1,
                                             "return_tokens_as_token_ids": True}).json()["choices"][0]["logprobs"]
    assert r["tokens"] == [f"token_id:{t}" for t in script[:2]] and list(r["top_logprobs"][0]) == [f"token_id:{script[0]}"]
    chat = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "logprobs": True, "top_logprobs": 1,
                                                      "return_tokens_as_token_ids": True}).json()
    first = chat["choices"][0]["logprobs"]["content"][0]
    assert first["token"] == f"token_id:{script[0]}" and first["top_logprobs"][0]["token"] == first["token"]


def test_request_id_headers_and_the_server_load(client):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers={"X-Request-Id": "abc-1"})
    assert r.headers["x-request-id"] == "abc-1"
    made = client.get("/v1/models").headers["x-request-id"]
    assert len(made) == 32 and made != client.get("/v1/models").headers["x-request-id"]
    assert client.get("/load").json() == {"server_load": 0}


def test_serving_on_a_unix_socket_under_a_root_path(engine, tmp_path):
    path, stop = str(tmp_path / "tp.sock"), threading.Event()
    t = threading.Thread(target=run_server, args=(engine,), kwargs={"stop": stop, "uds": path, "root_path": "/llm"},
                         daemon=True)
    t.start()
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://tensorpar") as c:
            deadline = time.time() + 20
            while not os.path.exists(path) or c.get("/health").status_code != 200:
                assert time.time() < deadline and t.is_alive(), "server did not start"
                time.sleep(0.05)
            assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
            assert c.get("/openapi.json").json()["servers"] == [{"url": "/llm"}]
    finally:
        stop.set()
        t.join(timeout=15)
