"""Function tools (``tensorpar.serve.tools``) and their replies (``ChatFormat``): calls parsed out
of Hermes-style text, the grammar of a required call followed by random decoding on SmolLM2's
tokenizer (every call parses and its arguments validate against the function's schema), and
replies with tool calls, whole and streamed."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest
from test_guided import decode, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from tensorpar.runtime.request import TokenEvent
from tensorpar.serve import tools
from tensorpar.serve.errors import APIError
from tensorpar.serve.protocol import ChatCompletionRequest
from tensorpar.serve.responses import ChatFormat, TokenText

FUNCTIONS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                         "b": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now"}},  # no parameters: arguments are {}
]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", tools.NO_ARGUMENTS) for t in FUNCTIONS}


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], tools=FUNCTIONS, **kw)


def test_calls_and_the_text_around_them_are_parsed():
    text = ('I will look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "add", "parameters": {"a": 1, "b": 2}}\n</tool_call>')
    content, calls = tools.parse(text)
    assert content == "I will look."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "celsius"}
    assert json.loads(calls[1]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert tools.parse("no calls here") == ("no calls here", [])
    assert tools.parse("") == (None, [])
    # a block that holds no call stays as text; the last block may lack its closing tag
    assert tools.parse("<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", [])
    content, [call] = tools.parse('<tool_call>\n{"name": "now", "arguments": {}}')
    assert content is None and call["function"] == {"name": "now", "arguments": "{}"}
    content, [call] = tools.parse('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert call["function"]["arguments"] == '{"a": 1}'  # already JSON text: kept as it is


@pytest.mark.parametrize("tool_choice, names", [("required", {"get_weather", "add", "now"}),
                                                ({"type": "function", "function": {"name": "add"}}, {"add"})])
def test_a_required_call_is_always_a_valid_call(compiler, tokenizer, tool_choice, names):  # noqa: F811
    guided = tools.forced_calls(request(tool_choice=tool_choice))
    seen = set()
    for seed in range(8):
        text = decode(compiler, tokenizer, guided, seed)
        content, calls = tools.parse(text)
        assert content is None and calls, text
        if not isinstance(tool_choice, str):
            assert len(calls) == 1
        for call in calls:
            name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
            assert name in names and jsonschema_rs.validator_for(SCHEMAS[name]).is_valid(args), text
            seen.add(name)
    assert seen == names


def test_which_tools_are_offered_and_when_a_call_is_forced():
    assert tools.offered(request()) == FUNCTIONS and tools.forced_calls(request()) is None  # auto
    assert tools.offered(request(tool_choice="none")) is None
    assert tools.forced_calls(request(tool_choice="none")) is None
    assert tools.offered(ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}])) is None
    one = tools.forced_calls(request(tool_choice="required", parallel_tool_calls=False)).value
    many = tools.forced_calls(request(tool_choice="required")).value
    assert one.startswith("start: tool_call\n") and many.startswith('start: tool_call ("\\n" tool_call)*\n')
    open_ended = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert tools._closed(open_ended) == {**open_ended, "additionalProperties": False}  # only declared parameters
    assert tools._closed({**open_ended, "additionalProperties": True})["additionalProperties"] is True
    with pytest.raises(APIError) as e:
        tools.forced_calls(request(tool_choice={"type": "function", "function": {"name": "missing"}}))
    assert e.value.param == "tool_choice" and "missing" in e.value.message
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]
    with pytest.raises(APIError) as e:
        tools.forced_calls(ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], tools=bad,
                                                 tool_choice="required"))
    assert e.value.param == "tools" and "Invalid type: objekt" in e.value.message


def test_earlier_calls_reach_the_template_with_their_arguments_as_objects():
    messages = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    fixed = tools.template_messages(messages)
    assert fixed[0]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 1, "b": 2}}
    assert fixed[1] == messages[1] and messages[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1, "b": 2}'


def events(tokenizer, text: str, reason: str) -> list[TokenEvent]:  # noqa: F811
    """One event per token of ``text``, the last ending the reply with ``reason``."""
    ids = tokenizer(text)["input_ids"]
    out, before = [], ""
    for k in range(len(ids)):
        now = tokenizer.decode(ids[: k + 1])
        last = k == len(ids) - 1
        out.append(TokenEvent("r-0", ids[k], now[len(before):], -0.5, [(ids[k], -0.5)], last, reason if last else None))
        before = now
    return out


def test_replies_with_calls_whole_and_streamed(tokenizer):  # noqa: F811
    text = 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    fmt = ChatFormat("chatcmpl-1", "m", TokenText(tokenizer), 1, False, tool_calls=True)
    choice = fmt.new_choice(0)
    evs = events(tokenizer, text, "stop")
    for ev in evs:
        choice.add(ev)
    [full] = fmt.full([choice], 5)["choices"]
    assert full["finish_reason"] == "tool_calls" and full["message"]["content"] == "Sure."
    assert full["message"]["tool_calls"][0]["function"]["name"] == "add"
    assert len(full["logprobs"]["content"]) == len(evs)
    chunks = [c for ev in evs for c in fmt.piece(0, ev, 0)]
    assert len(chunks) == 1  # the reply whole, with its end
    delta = chunks[0]["choices"][0]["delta"]
    assert delta["content"] == "Sure." and delta["tool_calls"][0]["index"] == 0
    assert json.loads(delta["tool_calls"][0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert len(chunks[0]["choices"][0]["logprobs"]["content"]) == len(evs)
    assert chunks[0]["choices"][0]["finish_reason"] == "tool_calls"
    # cut by the budget: still "length"; no call: plain content
    cut = ChatFormat("chatcmpl-2", "m", TokenText(tokenizer), None, False, tool_calls=True)
    chunks = [c for ev in events(tokenizer, text, "length") for c in cut.piece(0, ev, 0)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    chunks = [c for ev in events(tokenizer, "Just text.", "stop") for c in cut.piece(0, ev, 0)]
    assert chunks[0]["choices"][0]["delta"] == {"content": "Just text."}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    plain = ChatFormat("chatcmpl-3", "m", TokenText(tokenizer), None, False)  # no tools: the text as it is
    choice = plain.new_choice(0)
    for ev in evs:
        choice.add(ev)
    assert plain.full([choice], 5)["choices"][0]["message"] == {"role": "assistant", "content": text, "refusal": None}


def test_reasoning_is_split_from_content_whole_and_streamed(tokenizer):
    """``--reasoning-parser qwen3``: a whole reply's thinking between both tags; streamed, from
    <think> on until </think>, tags split across deltas held back; without <think>, all content."""
    from tensorpar.serve.reasoning import StreamSplitter, split

    assert split("<think>\nplan it\n</think>\n\nThe answer.") == ("\nplan it\n", "\n\nThe answer.")
    assert split("No thinking here.") == (None, "No thinking here.")
    assert split("<think>cut short") == (None, "<think>cut short")  # (vLLM's rule for a whole reply)
    s = StreamSplitter()
    parts = [s.feed(d) for d in ("<th", "ink>ab", "c</thi", "nk>The", " end")] + [s.feed("", final=True)]
    assert "".join(r for r, _ in parts) == "abc" and "".join(c for _, c in parts) == "The end"
    assert parts[0] == ("", "")  # "<th" might begin a tag: held
    s = StreamSplitter()
    assert "".join(c for _, c in [s.feed("a < b"), s.feed(" <", final=True)]) == "a < b <"
    fmt = ChatFormat("chatcmpl-4", "m", TokenText(tokenizer), None, False, reasoning=True)
    choice = fmt.new_choice(0)
    evs = events(tokenizer, "<think>why</think>Because.", "stop")
    chunks = []
    for ev in evs:
        choice.add(ev)
        chunks += fmt.piece(0, ev, 0)
    message = fmt.full([choice], 3)["choices"][0]["message"]
    assert message["reasoning"] == "why" and message["content"] == "Because."
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning", "") for d in deltas) == "why"
    assert "".join(d.get("content", "") for d in deltas) == "Because."
    hidden = ChatFormat("chatcmpl-5", "m", TokenText(tokenizer), None, False, reasoning=True, include_reasoning=False)
    assert hidden.full([choice], 3)["choices"][0]["message"]["reasoning"] is None
