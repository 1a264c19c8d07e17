"""``tensorpar serve`` at TP=2 driven with the official ``openai`` client, as a user would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import cli, rank_processes

from tensorpar.distributed.host import free_port

openai = pytest.importorskip("openai")


def start_server(model: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).with_name("tensorpar")
    proc = subprocess.Popen([str(exe), "serve", "--model", str(model), "--tp", "2", "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited early: {proc.stderr.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail("server did not become healthy")


def kill_rank(proc: subprocess.Popen, rank, timeout: float) -> tuple[int, str]:
    """SIGKILL one rank process of the server ``proc``; the server's exit code and stderr."""
    os.kill(rank.pid, signal.SIGKILL)
    return proc.wait(timeout=timeout), proc.stderr.read()


def solo_and_concurrent(client, model: str, prompts: list[str], max_tokens: int) -> tuple[list[str], list[str]]:
    """Each prompt's greedy text from a one-rank ``LLM``, and the same prompts sent at once
    through ``client``."""
    import tensorpar

    with tensorpar.LLM(model, tp=1, progress=False) as llm:
        solo = [c.text for c in llm.generate(prompts, max_new_tokens=max_tokens)]
    got = [None] * len(prompts)

    def run(i):
        got[i] = client.completions.create(model=model, prompt=prompts[i], max_tokens=max_tokens,
                                           temperature=0).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return solo, got


# every API feature below is served with speculative decoding: answers must be what tensorpar generate says without
SPECULATIVE = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'


@pytest.fixture(scope="module")
def server(tiny_chat_checkpoint):
    segments = set(Path("/dev/shm").glob("tensorpar-*"))
    proc, base = start_server(tiny_chat_checkpoint, "--max-num-seqs", "8", "--speculative-config", SPECULATIVE,
                              "--enable-prompt-tokens-details")
    ranks = [p for p in rank_processes() if p.ppid() == proc.pid]
    yield base, str(tiny_chat_checkpoint)
    proc.send_signal(signal.SIGTERM)  # drains and exits cleanly
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    time.sleep(0.5)
    assert not [p for p in ranks if p.is_running() and p.status() != "zombie"]
    assert set(Path("/dev/shm").glob("tensorpar-*")) <= segments


@pytest.fixture(scope="module")
def client(server):
    base, _ = server
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused")


def generate(model: str, prompt: str, *extra: str) -> dict:
    r = cli("generate", "--model", model, "--json", "--max-new-tokens", "12", "--prompt", prompt, *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.timeout(120)
def test_completion_and_chat_equal_tensorpar_generate(server, client):
    _, model = server
    c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    want = generate(model, "Once upon a time")
    assert c.choices[0].text == want["text"]
    assert c.usage.prompt_tokens == len(want["prompt_token_ids"])
    assert c.usage.completion_tokens == len(want["token_ids"])
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Explain TP"}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == generate(model, "Explain TP", "--chat")["text"]
    assert chat.choices[0].message.role == "assistant"
    assert [m.id for m in client.models.list().data] == [model]


@pytest.mark.timeout(120)
def test_streaming_equals_non_streaming_with_stop_and_seed(server, client):
    _, model = server
    full = client.completions.create(model=model, prompt="Tensor parallelism", max_tokens=12, temperature=0)
    text = full.choices[0].text
    chunks = list(client.completions.create(model=model, prompt="Tensor parallelism", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = client.completions.create(model=model, prompt="Tensor parallelism", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model=model, prompt="Hello", max_tokens=10, temperature=0.9, seed=7).choices[0].text
            for _ in range(2))
    assert a == b
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, temperature=0, stream=True)
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(pieces) == generate(model, "hi", "--chat", "--max-new-tokens", "8")["text"]


@pytest.mark.timeout(240)
def test_32_concurrent_streams_each_get_their_solo_output(server, client):
    _, model = server
    prompts = [f"Story number {i}:" for i in range(32)]
    with __import__("tensorpar").LLM(model, tp=1, progress=False) as llm:
        solo = [c.text for c in llm.generate(prompts, max_new_tokens=10)]
    got = [None] * 32

    def run(i):
        stream = client.completions.create(model=model, prompt=prompts[i], max_tokens=10, temperature=0, stream=True)
        got[i] = "".join(ch.choices[0].text for ch in stream if ch.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=200)
    assert got == solo


@pytest.mark.timeout(120)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client):
    base, model = server
    url = f"{base}/v1/completions"
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400),
        (dict(json={"model": "no-such-model", "prompt": "hi"}), 404),
        (dict(json={"model": model, "prompt": "hi", "max_tokens": -1}), 400),
        (dict(json={"model": model, "prompt": "hi", "max_tokens": 10**9}), 400),
        (dict(json={"model": model, "prompt": ""}), 400),
    ]
    for kwargs, status in cases:
        r = httpx.post(url, timeout=30, **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        assert "message" in r.json()["error"]
    ok = client.completions.create(model=model, prompt="still there? still there? still", max_tokens=8, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    value = {ln.split("{")[0]: float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith(("vllm:spec", "tensorpar_spec"))}
    assert value["vllm:spec_decode_num_draft_tokens_total"] > 0  # (n-gram drafts from the prompt)
    assert value["vllm:spec_decode_num_accepted_tokens_total"] == value["tensorpar_spec_decode_num_accepted_tokens_total"]
    assert 0 <= value["tensorpar_spec_decode_acceptance_rate"] <= 1


@pytest.mark.timeout(180)
def test_killed_worker_makes_the_server_exit_naming_the_rank(tiny_chat_checkpoint):
    proc, base = start_server(tiny_chat_checkpoint)
    try:
        (worker,) = [p for p in rank_processes() if p.ppid() == proc.pid]
        assert worker.info["name"] == "tensorpar-r1"
        code, err = kill_rank(proc, worker, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code != 0
    assert "rank 1 of 2 failed: killed by signal SIGKILL" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def llm(server):
    """``LLM`` on the server's model, at the server's degree and context (2048, serve's default)."""
    _, model = server
    with __import__("tensorpar").LLM(model, tp=2, max_model_len=2048, progress=False) as engine:
        yield engine


@pytest.mark.timeout(300)
def test_the_same_request_gives_the_same_text_through_llm_cli_and_http(server, client, llm):
    """Stop strings, a prompt that fills the context but for a few tokens, and n > 1 with a seed:
    one scheduler behind ``LLM.generate``, ``tensorpar generate --json`` and the server."""
    _, model = server
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)

    def cli_texts(prompt: str, *extra: str) -> list[str]:
        r = cli("generate", "--model", model, "--tp", "2", "--max-model-len", "2048", "--json", "--quiet",
                "--prompt", prompt, *extra)
        assert r.returncode == 0, r.stderr
        return [c["text"] for c in json.loads(r.stdout)["completions"]]

    # stop strings: cut before the first one, reason "stop"
    base = llm.generate(["Once upon a time"], max_new_tokens=12, ignore_eos=True)[0].text
    stop = base[len(base) // 2: len(base) // 2 + 3]
    want = llm.generate(["Once upon a time"], max_new_tokens=12, ignore_eos=True, stop=[stop])[0]
    assert want.finish_reason == "stop" and want.text == base[: base.find(stop)]
    http = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0,
                                     stop=[stop], extra_body={"ignore_eos": True})
    assert http.choices[0].text == want.text and http.choices[0].finish_reason == "stop"
    assert cli_texts("Once upon a time", "--max-new-tokens", "12", "--ignore-eos", "--stop", stop) == [want.text]

    # a prompt 3 tokens short of the context: 3 tokens, reason "length"; one more is refused everywhere
    words = 2048
    while len(tokenizer("x " * words)["input_ids"]) > 2045:
        words -= 1
    prompt = "x " * words
    room = 2048 - len(tokenizer(prompt)["input_ids"])
    assert 1 <= room <= 3
    near = llm.generate([prompt], max_new_tokens=room, ignore_eos=True)[0]
    assert len(near.token_ids) == room and near.finish_reason == "length"
    http = client.completions.create(model=model, prompt=prompt, max_tokens=room, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert http.choices[0].text == near.text and http.usage.completion_tokens == room
    assert cli_texts(prompt, "--max-new-tokens", str(room), "--ignore-eos") == [near.text]
    with pytest.raises(ValueError, match="more than the context of 2048 tokens"):
        llm.generate([prompt], max_new_tokens=room + 1)
    r = httpx.post(f"{server[0]}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": room + 1},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = cli("generate", "--model", model, "--tp", "2", "--max-model-len", "2048", "--max-new-tokens",
            str(room + 1), "--prompt", prompt)
    assert r.returncode == 1 and "more than the context of 2048 tokens" in r.stderr and "Traceback" not in r.stderr

    # n > 1 with a seed: choice i samples with seed + i, alike everywhere
    sampled = [c.text for c in llm.generate(["Hello"], max_new_tokens=10, temperature=0.9, seed=7, n=3)]
    assert len(set(sampled)) > 1
    http = client.completions.create(model=model, prompt="Hello", max_tokens=10, temperature=0.9, seed=7, n=3)
    assert [c.text for c in sorted(http.choices, key=lambda c: c.index)] == sampled
    assert cli_texts("Hello", "--max-new-tokens", "10", "--temperature", "0.9", "--seed", "7", "-n", "3") == sampled


@pytest.mark.timeout(240)
def test_pipeline_server_answers_then_a_dead_stage_rank_is_named(tiny_chat_checkpoint):
    """tp=2 x pp=2 (4 ranks, a layer per stage): concurrent requests through the openai client
    give one rank's text; a rank of the second stage SIGKILLed mid-decode stops the server with
    one line naming it and its place, every rank gone and no shared-memory segment left."""
    segments = set(Path("/dev/shm").glob("tensorpar-*"))
    proc, base = start_server(tiny_chat_checkpoint, "--pp", "2", "--max-num-seqs", "4")
    ranks = [p for p in rank_processes() if p.ppid() == proc.pid]
    try:
        assert sorted(p.info["name"] for p in ranks) == ["tensorpar-r1", "tensorpar-r2", "tensorpar-r3"]
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        prompts = [f"Pipeline request {i}:" for i in range(6)]
        solo, got = solo_and_concurrent(client, str(tiny_chat_checkpoint), prompts, 10)
        assert got == solo

        stream = client.completions.create(model=str(tiny_chat_checkpoint), prompt="A long story:", max_tokens=2000,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))  # decoding has begun
        (victim,) = [p for p in ranks if p.info["name"] == "tensorpar-r3"]
        code, err = kill_rank(proc, victim, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code != 0 and "Traceback" not in err
    assert "rank 3 of 4 (stage 1 of 2, tp rank 1 of 2) failed: killed by signal SIGKILL" in err
    time.sleep(0.5)
    assert not [p for p in ranks if p.is_running() and p.status() != "zombie"]
    assert set(Path("/dev/shm").glob("tensorpar-*")) <= segments


@pytest.mark.timeout(120)
def test_a_stage_that_stops_answering_is_named_within_the_timeout(tiny_chat_checkpoint):
    """tp=1 x pp=2 with --timeout 5: the second stage SIGSTOPped mid-decode (alive, silent) stops
    the server within the timeout and its shutdown, naming the rank and its stage; no rank is left."""
    proc, base = start_server(tiny_chat_checkpoint, "--tp", "1", "--pp", "2", "--timeout", "5")
    ranks = [p for p in rank_processes() if p.ppid() == proc.pid]
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        stream = client.completions.create(model=str(tiny_chat_checkpoint), prompt="A long story:", max_tokens=2000,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        (victim,) = ranks
        t0 = time.monotonic()
        os.kill(victim.pid, signal.SIGSTOP)
        code = proc.wait(timeout=60)
        took = time.monotonic() - t0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in ranks:
            if p.is_running():
                p.kill()
    assert code != 0 and "Traceback" not in err
    assert "rank 1 of 2 (stage 1 of 2, tp rank 0 of 1) failed: did not answer" in err
    assert took < 30
    time.sleep(0.5)
    assert not [p for p in ranks if p.is_running() and p.status() != "zombie"]


@pytest.mark.timeout(240)
def test_experts_over_two_ranks_serve_16_streams_and_a_dead_expert_rank_is_named(tiny_moe_chat_checkpoint):
    """Qwen2-MoE at --ep 2 (attention replicated, 3 experts per rank): 16 concurrent requests
    through the openai client each give their solo greedy text; /metrics counts tokens per expert
    and the load imbalance; SIGKILL of the rank holding experts 3-5 mid-decode stops the server
    within 30 s naming the rank and its expert set."""
    model = str(tiny_moe_chat_checkpoint)
    proc, base = start_server(tiny_moe_chat_checkpoint, "--tp", "1", "--ep", "2", "--max-num-seqs", "16")
    ranks = [p for p in rank_processes() if p.ppid() == proc.pid]
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        prompts = [f"Expert request {i}:" for i in range(16)]
        solo, got = solo_and_concurrent(client, model, prompts, 8)
        assert got == solo
        metrics = httpx.get(f"{base}/metrics").text
        routed = [float(ln.split()[-1]) for ln in metrics.splitlines()
                  if ln.startswith("tensorpar_expert_tokens_total{") and 'layer="0",replica="0"}' in ln]
        assert len(routed) == 6 and sum(routed) > 0 and sum(routed) % 2 == 0  # top-2 of 6, every token
        imbalance = [float(ln.split()[-1]) for ln in metrics.splitlines()
                     if ln.startswith('tensorpar_expert_load_imbalance{layer="0",replica="0"}')]
        assert len(imbalance) == 1 and 1.0 <= imbalance[0] <= 2.0

        stream = client.completions.create(model=model, prompt="A long story:", max_tokens=2000, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        t0 = time.monotonic()
        code, err = kill_rank(proc, ranks[0], 60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code != 0 and "Traceback" not in err and took < 30
    assert "rank 1 of 2 (expert set 1 of 2) failed: killed by signal SIGKILL" in err
    time.sleep(0.5)
    assert not [p for p in ranks if p.is_running() and p.status() != "zombie"]


@pytest.mark.timeout(300)
def test_echo_with_logprobs_scores_a_batch_of_prompts_as_llm_score_does(server, client, llm):
    """What lm-evaluation-harness's local-completions sends for log-likelihoods: a batch of token-id
    prompts, echo, logprobs, max_tokens 0 (or 1)."""
    import torch
    from transformers import AutoTokenizer

    base, model = server
    tok = AutoTokenizer.from_pretrained(model)
    texts = ["The capital of France is Paris", "def add(a, b): return a + b", "Once upon a time"]
    prompts = [tok(t)["input_ids"] for t in texts]
    want = [torch.log_softmax(logits.float(), -1) for logits in llm.score(prompts)]
    for max_tokens in (0, 1):
        r = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": prompts, "echo": True, "logprobs": 1,
                                                       "max_tokens": max_tokens, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert body["usage"]["prompt_tokens"] == sum(map(len, prompts))
        for choice, ids, logp in zip(body["choices"], prompts, want):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(ids) + max_tokens and lp["token_logprobs"][0] is None
            assert lp["tokens"][:len(ids)] == [tok.decode([i]) for i in ids]
            expected = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
            assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:len(ids)], expected)) < 1e-4
            for i in range(1, len(ids)):  # the token itself and the one top entry (the reference's argmax), as vLLM
                best = int(logp[i - 1].argmax())
                top = lp["top_logprobs"][i]
                assert set(top) == {tok.decode([ids[i]]), tok.decode([best])}
                assert abs(top[tok.decode([best])] - float(logp[i - 1, best])) < 1e-4
                assert max(top, key=top.get) == tok.decode([best])  # how lm-eval tells a greedy token
            assert choice["text"].startswith(tok.decode(ids)) and choice["finish_reason"] == "length"
    echoed = client.completions.create(model=model, prompt=texts[2], echo=True, max_tokens=4, temperature=0)
    plain = client.completions.create(model=model, prompt=texts[2], max_tokens=4, temperature=0)
    assert echoed.choices[0].text == texts[2] + plain.choices[0].text
    chunks = client.completions.create(model=model, prompt=texts[2], echo=True, max_tokens=4, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text
    r = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "hi", "best_of": 3}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    r = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 0}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # 0 only with echo


@pytest.mark.timeout(300)
def test_logit_bias_and_stop_token_ids_steer_the_engine(server, client, llm):
    base, model = server
    prompt = "Once upon a time"
    [free] = llm.generate([prompt], max_new_tokens=8, ignore_eos=True)
    forced = free.token_ids[0] + 1  # not what it would choose first
    r = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, logprobs=1,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].logprobs.tokens == [client_text(llm, forced)] * 5
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": [stop_at], "ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == first + 1
    [cut] = llm.generate([prompt], max_new_tokens=first, ignore_eos=True)
    assert r.choices[0].text == cut.text  # the stop token's own text is left out


@pytest.mark.timeout(300)
def test_vllm_request_fields_change_the_output_as_vllm_documents_them(server, client, llm):
    """The vLLM fields a request may send beyond OpenAI's, through the openai client's extra_body
    (and httpx for the raw shape): each changes the reply as documented, or is a 400 naming it."""
    import torch
    from transformers import AutoTokenizer

    base, model = server
    tok = AutoTokenizer.from_pretrained(model)
    prompt = "Once upon a time"
    ids = tok(prompt)["input_ids"]
    [free] = llm.generate([prompt], max_new_tokens=8, ignore_eos=True)
    greedy = dict(model=model, prompt=prompt, max_tokens=8, temperature=0)

    def post(**body):
        r = httpx.post(f"{base}/v1/completions", json={"model": model, "temperature": 0, **body}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    # return_token_ids, and prompt_logprobs equal to the reference's scores (null first, then id -> entry)
    r = post(prompt=prompt, max_tokens=8, return_token_ids=True, prompt_logprobs=2, ignore_eos=True)
    choice = r["choices"][0]
    assert choice["prompt_token_ids"] == ids and choice["token_ids"] == list(free.token_ids)
    want = torch.log_softmax(llm.score([ids])[0].float(), -1)
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(ids)
    for i, entry in enumerate(choice["prompt_logprobs"][1:], 1):
        assert abs(entry[str(ids[i])]["logprob"] - float(want[i - 1, ids[i]])) < 1e-4
        best = int(want[i - 1].argmax())
        assert entry[str(best)]["rank"] == 1 and entry[str(best)]["decoded_token"] == tok.decode([best])
    assert post(prompt=prompt, max_tokens=1)["choices"][0]["prompt_logprobs"] is None
    # token filters: only the allowed ids; a bad word's tokens never completed
    allowed = [free.token_ids[1], free.token_ids[2]]
    got = client.completions.create(**greedy, extra_body={"allowed_token_ids": allowed, "return_token_ids": True})
    assert set(got.choices[0].model_extra["token_ids"]) <= set(allowed)
    word = tok.decode(free.token_ids[:1]).strip()
    barred = client.completions.create(**greedy, extra_body={"bad_words": [word], "ignore_eos": True})
    assert word not in barred.choices[0].text and barred.choices[0].text != free.text
    # the prompt's last k tokens; the stop string kept
    short = client.completions.create(**greedy, extra_body={"truncate_prompt_tokens": 2})
    assert short.usage.prompt_tokens == 2
    stop = free.text[4:9]
    kept = client.completions.create(**greedy, stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text.endswith(stop) and kept.choices[0].finish_reason == "stop"
    # chat: continue the assistant's last message, and echo it
    messages = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                          extra_body={"continue_final_message": True, "add_generation_prompt": False,
                                                      "echo": True})
    rendered = tok.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_dict=False)
    [cont] = llm.generate([list(rendered)], max_new_tokens=6)
    assert chat.choices[0].message.content == "Once upon" + cont.text
    # the usage says how much of a prompt the prefix cache held (--enable-prompt-tokens-details)
    long = "A prompt long enough to fill whole cache blocks of sixteen positions, " * 3
    first = client.completions.create(model=model, prompt=long, max_tokens=1, temperature=0)
    again = client.completions.create(model=model, prompt=long, max_tokens=1, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == (first.usage.prompt_tokens - 1) // 16 * 16
    # the engine's steps, in vLLM's histogram
    steps = re.search(r'^vllm:iteration_tokens_total_count\{model_name="[^"]*"\} (\S+)$',
                      httpx.get(f"{base}/metrics", timeout=10).text, re.M)
    assert steps and float(steps.group(1)) > 0
    # what is not built is refused, naming the field
    for field, value in (("use_beam_search", True), ("prompt_embeds", "AAAA"), ("skip_special_tokens", False)):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**greedy, extra_body={field: value})
        assert e.value.body["param"] == field


# Qwen3's way of thinking: the model opens <think> itself; with enable_thinking false the
# template closes an empty thought in the prompt
THINKING_TEMPLATE = ("{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
                     "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- if enable_thinking is defined and "
                     "enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}")


@pytest.fixture(scope="module")
def qwen3_thinking_checkpoint(tmp_path_factory):
    from helpers import write_chat_checkpoint
    from transformers import AutoTokenizer

    path = write_chat_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen3-chat", "qwen3")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = THINKING_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.mark.timeout(300)
def test_reasoning_parser_returns_qwen3s_thinking_apart(qwen3_thinking_checkpoint):
    """``--reasoning-parser qwen3`` at tp=2: the reply (forced by a regex into Qwen3's shape)
    comes back as ``reasoning`` and ``content``, whole and streamed; ``enable_thinking: false``
    reaches the template, which closes the thought in the prompt, and the reply is all content."""
    proc, base = start_server(qwen3_thinking_checkpoint, "--reasoning-parser", "qwen3")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        model = str(qwen3_thinking_checkpoint)
        ask = dict(model=model, messages=[{"role": "user", "content": "Why?"}], max_tokens=40, temperature=0)
        shaped = {"guided_regex": "<think>[a-z ]{2,12}</think>[a-z ]{2,12}"}
        whole = client.chat.completions.create(**ask, extra_body=shaped).choices[0]
        reasoning = whole.message.model_extra["reasoning"]
        assert reasoning and whole.message.content and "<think>" not in whole.message.content + reasoning
        stream = client.chat.completions.create(**ask, stream=True, extra_body=shaped)
        deltas = [c.choices[0].delta for c in stream if c.choices]
        assert "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas) == reasoning
        assert "".join(d.content or "" for d in deltas) == whole.message.content
        off = {"chat_template_kwargs": {"enable_thinking": False}}
        ids = httpx.post(f"{base}/tokenize", json={"model": model, "messages": ask["messages"], **off}).json()["tokens"]
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(model).decode(ids).endswith("assistant<think>\n\n</think>")
        plain = client.chat.completions.create(**ask, extra_body={**off, "guided_regex": "[a-z ]{2,12}"}).choices[0]
        assert plain.message.model_extra["reasoning"] is None and plain.message.content
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def client_text(llm, token: int) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llm.spec.model).decode([token])


@pytest.mark.timeout(300)
def test_update_weights_from_disk_waits_for_running_streams_then_serves_the_new_checkpoint(
        tiny_chat_checkpoint, tiny_moe_chat_checkpoint, trained_chat_checkpoint):
    """SGLang's route, as RL loops call it: at tp=3 in deterministic mode, a stream running when
    the reload is asked for ends on the old weights; afterwards the server answers as the trained
    checkpoint does at tp=1; another model is refused with a 400 and nothing changes."""
    proc, base = start_server(tiny_chat_checkpoint, "--tp", "3", "--deterministic")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        model = str(tiny_chat_checkpoint)

        def complete(max_tokens=12):
            return client.completions.create(model=model, prompt="Once upon a time", max_tokens=max_tokens,
                                             temperature=0).choices[0].text

        old, old_long = complete(), complete(64)
        refused = httpx.post(f"{base}/update_weights_from_disk", json={"model_path": str(tiny_moe_chat_checkpoint)},
                             timeout=60)
        assert refused.status_code == 400 and refused.json()["success"] is False
        assert "holds another model than the one loaded" in refused.json()["message"]
        assert refused.json()["error"]["param"] == "model_path"  # (and OpenAI's error object)
        unreadable = httpx.post(f"{base}/update_weights_from_disk", json={"model_path": "x" * 300}, timeout=60)
        assert unreadable.status_code == 400 and "File name too long" in unreadable.json()["message"]
        assert complete() == old
        stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=64, temperature=0,
                                           stream=True)
        chunks = iter(stream)
        first = next(chunks).choices[0].text  # running now
        answers = {}
        reload = threading.Thread(target=lambda: answers.update(r=httpx.post(
            f"{base}/update_weights_from_disk", json={"model_path": str(trained_chat_checkpoint)}, timeout=120)))
        reload.start()
        assert first + "".join(ch.choices[0].text for ch in chunks if ch.choices) == old_long
        reload.join(timeout=120)
        assert answers["r"].status_code == 200 and answers["r"].json()["success"] is True, answers["r"].text
        from tensorpar import LLM
        from tensorpar.layers import deterministic

        try:
            with LLM(str(trained_chat_checkpoint), tp=1, deterministic=True, progress=False) as llm:
                want = llm.generate(["Once upon a time"], max_new_tokens=12)[0].text
        finally:
            deterministic.enable(False)  # (a tp=1 LLM runs in this process)
        assert complete() == want != old
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
