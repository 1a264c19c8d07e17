"""Function tools in chat (OpenAI's ``tools`` and ``tool_choice``), in the Hermes format:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

- the chat template is given the tools (``offered``; none with ``tool_choice="none"``) and renders
  them, the earlier calls of assistant messages (``template_messages``) and the tool results
  (``role: "tool"`` messages); ``HERMES_TEMPLATE`` is such a template for ChatML models (SmolLM2,
  Qwen2), for those whose own template knows no tools;
- ``tool_choice="required"`` or a named function holds the output to such calls with a grammar
  (``forced_calls``), each call's arguments valid under its function's ``parameters`` schema, so
  that even a small model produces a call a client can run; ``"auto"`` leaves the text free;
- the generated text is parsed back (``parse``) into OpenAI's ``tool_calls`` and the text around them.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

from tensorpar.runtime.guided import JSON_OPTIONS, GuidedDecoding
from tensorpar.serve.errors import APIError
from tensorpar.serve.protocol import ChatCompletionRequest

HERMES_TEMPLATE = Path(__file__).with_name("templates") / "hermes_tools.jinja"  # for ChatML models
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)  # the last call may be cut short
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def choice(body: ChatCompletionRequest) -> str:
    """``tool_choice`` as ``"none"``, ``"auto"``, ``"required"`` or ``"function"`` (one function,
    ``named(body)``, must be called); its default is ``"auto"`` with tools and ``"none"``
    without, as OpenAI's."""
    tc = body.tool_choice
    if tc is None:
        return "auto" if body.tools else "none"
    return tc if isinstance(tc, str) else "function"


def named(body: ChatCompletionRequest) -> str | None:
    """The function ``tool_choice`` names, if it names one."""
    return None if body.tool_choice is None or isinstance(body.tool_choice, str) else body.tool_choice.function.name


def _check(body: ChatCompletionRequest) -> None:
    names = [t.function.name for t in body.tools or []]
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise APIError(400, f"tool names are 1 to 64 letters, digits, '_', '.' or '-', got {name!r}",
                           param="tools")
    if len(set(names)) != len(names):
        raise APIError(400, "tools has two functions of the same name", param="tools")
    if choice(body) in ("required", "function") and not names:
        raise APIError(400, "tool_choice asks for a tool call, but no tools are given", param="tool_choice")
    if choice(body) == "function" and named(body) not in names:
        raise APIError(400, f"tool_choice names the function {named(body)!r}, which is not among tools "
                            f"({', '.join(names)})", param="tool_choice")


def offered(body: ChatCompletionRequest) -> list[dict] | None:
    """The tools the chat template lists for the model, as OpenAI's dicts; None when none are
    offered (no tools, or ``tool_choice="none"``): the reply is then plain text."""
    _check(body)
    if not body.tools or choice(body) == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in body.tools]


def _closed(parameters: dict) -> dict:
    """``parameters`` with ``additionalProperties: false`` where it declares properties and says
    nothing of others: a forced call passes only the parameters the function declares (a small
    model otherwise goes on inventing more)."""
    if "properties" in parameters and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def forced_calls(body: ChatCompletionRequest) -> GuidedDecoding | None:
    """The grammar of the reply when a call is required: one or more calls (one only for a named
    function, or with ``parallel_tool_calls=false``), one per line, nothing around them. The
    arguments of each are valid under the function's ``parameters`` and hold only the parameters
    it declares (``_closed``)."""
    chosen = choice(body)
    if offered(body) is None or chosen == "auto":
        return None
    tools = [t.function for t in body.tools if chosen == "required" or t.function.name == named(body)]
    rules, alternatives = [], []
    for i, f in enumerate(tools):
        head = '{"name": ' + json.dumps(f.name) + ', "arguments": '
        schema = {"x-guidance": JSON_OPTIONS, **_closed(f.parameters if f.parameters is not None else NO_ARGUMENTS)}
        rules += [f"fn_{i}: {json.dumps(head)} args_{i} " + '"}"', f"args_{i}: %json {json.dumps(schema)}"]
        alternatives.append(f"fn_{i}")
    one = chosen != "required" or body.parallel_tool_calls is False
    lines = ["start: tool_call" if one else 'start: tool_call ("\\n" tool_call)*',
             f"tool_call: {json.dumps(OPEN + chr(10))} ({' | '.join(alternatives)}) {json.dumps(chr(10) + CLOSE)}",
             *rules]
    try:
        return GuidedDecoding("grammar", "\n".join(lines))
    except ValueError as e:  # a function's parameters are not a schema llguidance can follow
        raise APIError(400, f"the tools' parameters cannot constrain the output: {e}", param="tools") from None


def template_messages(messages: list[dict]) -> list[dict]:
    """``messages`` as chat templates expect them: the ``arguments`` of an assistant message's
    ``tool_calls`` as objects (OpenAI sends them as JSON text)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and isinstance(calls, list):
            fixed = []
            for call in calls:
                fn = dict(call.get("function") or {}) if isinstance(call, dict) else {}
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        raise APIError(400, f"the arguments of tool call {call.get('id')!r} are not JSON: "
                                            f"{fn['arguments']!r}", param="messages") from None
                fixed.append({**call, "function": fn} if fn else call)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


def _call(text: str) -> dict | None:
    """One call's JSON (``{"name", "arguments"}``; ``parameters`` is taken for ``arguments``) as
    OpenAI's ``tool_calls`` entry; None when it is not such JSON."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"],
                         "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


def parse(text: str) -> tuple[str | None, list[dict]]:
    """The generated ``text`` as (content, tool calls): each ``<tool_call>`` block holding a call's
    JSON becomes a call (the last block may lack its closing tag, as when the budget ran out);
    the text outside them, stripped, is the content (None when empty). Blocks that do not hold
    such JSON stay in the content as they are."""
    calls, kept, at = [], [], 0
    for m in _CALL.finditer(text):
        call = _call(m.group(1))
        if call is None:
            continue
        calls.append(call)
        kept.append(text[at:m.start()])
        at = m.end()
    kept.append(text[at:])
    content = "".join(kept).strip()
    return (content or None), calls
