"""/metrics under vLLM's names beside tensorpar's, and the per-request log line."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from tensorpar.serve.app import create_app
from test_serve_app import CHAT, FakeEngine


@pytest.fixture
def engine(tokenizer):
    return FakeEngine(tokenizer)


def test_vllm_names_carry_the_same_values_as_ours(engine):
    engine.stats_extra = {"prefix_cache_queries": 96, "prefix_cache_hits": 64, "preemptions": 2, "free_blocks": 7,
                          "kv_blocks": 10, "spec_drafts": 4, "spec_draft_tokens": 16, "spec_accepted_tokens": 6,
                          "spec_accepted_per_pos": [3, 2, 1, 0]}
    with TestClient(create_app(engine, served_names=["my-model"])) as client:
        client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "stream": True})
        text = client.get("/metrics").text
    m = 'model_name="my-model"'
    for line in (
        f"vllm:generation_tokens_total{{{m}}} 5.0",
        "tensorpar_generation_tokens_total 5.0",
        f"vllm:time_to_first_token_seconds_count{{{m}}} 2.0",
        f"vllm:inter_token_latency_seconds_count{{{m}}} 3.0",
        f"vllm:time_per_output_token_seconds_count{{{m}}} 3.0",
        f"vllm:e2e_request_latency_seconds_count{{{m}}} 2.0",
        f'vllm:request_success_total{{finished_reason="length",{m}}} 2.0',
        f"vllm:num_requests_running{{{m}}} 0.0",
        f"vllm:num_requests_waiting{{{m}}} 0.0",
        f"vllm:kv_cache_usage_perc{{{m}}} 0.0",
        f"vllm:gpu_cache_usage_perc{{{m}}} 0.0",
        f"vllm:prefix_cache_queries_total{{{m}}} 96.0",
        f"vllm:prefix_cache_hits_total{{{m}}} 64.0",
        f"vllm:num_preemptions_total{{{m}}} 2.0",
        'tensorpar_prefix_cache_hits_total{replica="0"} 64.0',
        'tensorpar_kv_cache_free_blocks{replica="0"} 7.0',
        'tensorpar_kv_cache_blocks{replica="0"} 10.0',
        f"vllm:spec_decode_num_drafts_total{{{m}}} 4.0",
        f"vllm:spec_decode_num_draft_tokens_total{{{m}}} 16.0",
        f"vllm:spec_decode_num_accepted_tokens_total{{{m}}} 6.0",
        f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{m},position="1"}} 2.0',
        'tensorpar_spec_decode_acceptance_rate{replica="0"} 0.375',
        'tensorpar_spec_decode_mean_acceptance_length{replica="0"} 2.5',
    ):
        assert line in text, line
    assert f"vllm:prompt_tokens_total{{{m}}}" in text


def test_each_request_is_logged_once_with_its_tokens_and_latency(engine, caplog):
    with TestClient(create_app(engine)) as client, caplog.at_level(logging.INFO, "tensorpar.serve.requests"):
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "n": 2}).json()
        client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 0})  # a 400: never reaches the engine
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "tensorpar.serve.requests"]
    assert len(lines) == 1
    line = lines[0]
    prompt = r["usage"]["prompt_tokens"]
    assert line.startswith(f"POST /v1/completions {r['id']} prompt_tokens={prompt} completion_tokens=6 n=2 ")
    assert "finish=length" in line and "ttft=" in line and "latency=" in line


def test_generation_config_defaults_fill_only_what_a_request_leaves_out(engine):
    engine.sampling_defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1,
                                "max_new_tokens": 7}
    with TestClient(create_app(engine)) as client:
        client.post("/v1/completions", json={"prompt": "Hi"})
        p = engine.submitted[-1].params
        assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_new_tokens) == (0.6, 0.9, 20, 1.1, 7)
        client.post("/v1/chat/completions", json={**CHAT, "temperature": 0, "top_k": 3, "max_tokens": 2})
        p = engine.submitted[-1].params
        assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_new_tokens) == (0.0, 0.9, 3, 1.1, 2)
    engine.sampling_defaults = {}
    with TestClient(create_app(engine)) as client:
        client.post("/v1/completions", json={"prompt": "Hi"})
        p = engine.submitted[-1].params
        assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_new_tokens) == (1.0, 1.0, 0, 1.0, 16)
