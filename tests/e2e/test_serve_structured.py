"""Structured output and tool calls through ``tensorpar serve`` at TP=2 with the real SmolLM2-135M
(instruct) and tensorpar's Hermes tools template, driven with the official ``openai`` client: every
JSON reply validates against its schema, and a tool call makes the round trip (call, result, answer).
One server serves every test of this module, with n-gram speculative decoding: drafts are cut where
a grammar forbids them, and every position of a draft is masked as its grammar stands there."""

from __future__ import annotations

import json
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import jsonschema_rs
import pytest
from test_serve_openai import start_server

from tensorpar.serve.tools import HERMES_TEMPLATE

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 30},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
    "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}
PROMPTS = [
    "Invent a person who lives in Paris.", "Describe a retired teacher.", "Make up a young football player.",
    "Create a character for a mystery novel.", "Tell me about a fictional chef from Italy.",
    "Invent a scientist who studies whales.", "Describe a pilot who flies small planes.",
    "Make up a student who loves chess.", "Create a farmer from Kenya.", "Invent a musician who plays jazz.",
    "Describe a grandmother who knits.", "Make up an astronaut.", "Create a painter living in Mexico City.",
    "Invent a baker in Vienna.", "Describe a teenager who codes games.", "Make up a firefighter from Chicago.",
    "Create a librarian who collects maps.", "Invent a marathon runner.", "Describe a doctor in Tokyo.",
    "Make up a sailor who crossed the Atlantic.",
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


SPECULATIVE = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}'


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    proc, base = start_server(smollm2_gguf, "--chat-template", str(HERMES_TEMPLATE), "--max-num-seqs", "8",
                              "--speculative-config", SPECULATIVE)  # (drafts cut and masked by each grammar)
    yield base, str(smollm2_gguf)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()


@pytest.fixture(scope="module")
def client(server):
    base, _ = server
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused")


def valid_call(call, tools: list[dict]) -> dict:
    """A tool call's arguments, checked: a function offered, arguments valid under its schema."""
    [fn] = [t["function"] for t in tools if t["function"]["name"] == call.function.name]
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert jsonschema_rs.validator_for(fn["parameters"]).is_valid(args), call.function.arguments
    return args


def test_json_schema_replies_validate_for_20_prompts(server, client):
    _, model = server
    validator = jsonschema_rs.validator_for(PERSON)
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def ask(prompt: str):
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                              response_format=response_format, max_tokens=160, temperature=0)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, PROMPTS))
    for prompt, r in zip(PROMPTS, replies):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (prompt, choice.message.content)
        value = json.loads(choice.message.content)
        assert validator.is_valid(value), (prompt, choice.message.content)
    assert len({r.choices[0].message.content for r in replies}) > 10  # the prompts matter


def test_regex_and_choice_through_extra_body(server, client):
    _, model = server
    date = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r = client.completions.create(model=model, prompt="The date of the first moon landing (YYYY-MM-DD):",
                                  max_tokens=20, temperature=0, extra_body={"guided_regex": date})
    assert re.fullmatch(date, r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                       max_tokens=5, temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")


def test_a_tool_call_round_trip(server, client):
    _, model = server
    tools = [WEATHER, ADD]
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    r = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=80, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and valid_call(call, tools)["city"]
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id,
                  "content": json.dumps({"temperature": 21, "unit": "celsius", "sky": "sunny"})}]
    final = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="none",
                                           max_tokens=60, temperature=0).choices[0]
    assert not final.message.tool_calls and final.message.content and "21" in final.message.content
    # "required": a call of whichever function fits, here the sum
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 17 plus 25?"}],
                                       tools=tools, tool_choice="required", parallel_tool_calls=False,
                                       max_tokens=80, temperature=0)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "add" and valid_call(call, tools) == {"a": 17, "b": 25}
    # streamed: the call arrives whole at the end
    chunks = list(client.chat.completions.create(model=model, messages=messages[:1], tools=tools, max_tokens=80,
                                                 temperature=0, stream=True, tool_choice="required",
                                                 parallel_tool_calls=False))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    [streamed] = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert streamed.function.name == "get_weather" and json.loads(streamed.function.arguments)["city"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # a function whose parameters are no schema is refused, and the server goes on
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=messages[:1], tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "objekt"}}}], tool_choice="required", max_tokens=5)
