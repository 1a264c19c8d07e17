"""From a validated request body to prompt token ids and ``Request``s: the OpenAI parameters
mapped onto the runtime's own checks (``tensorpar.runtime.inputs``), each failing as a 400 that
names the parameter and the numbers. Structured output (``response_format``, vLLM's ``guided_*``
and ``structured_outputs``, a required tool call) becomes ``SamplingParams.guided``."""

from __future__ import annotations

from dataclasses import dataclass

from tensorpar.runtime.guided import GuidedDecoding
from tensorpar.runtime.inputs import ContextLengthError, InputProcessor
from tensorpar.runtime.request import Request, requests_for
from tensorpar.runtime.sampling import SamplingParams
from tensorpar.serve import tools
from tensorpar.serve.errors import APIError
from tensorpar.serve.fields import REFUSED
from tensorpar.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

MAX_N = 32  # choices per request, unless the server sets its own bound
MAX_LOGPROBS = 20  # top log-probabilities per token
COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI
CHAT_DEFAULT_MAX_TOKENS = 1024  # chat default: what fits in the context, at most this


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server, and what it gets unasked (``tensorpar serve
    --max-n / --max-tokens-limit / --trust-request-chat-template / --enable-force-include-usage``):
    at most ``max_n`` choices, at most ``max_tokens`` generated tokens per choice (None: what the
    context leaves), its own ``chat_template`` only if ``trust_chat_template``, with
    ``force_usage`` a stream's usage whether asked for or not, and with ``reasoning_parser``
    (``serve.reasoning``) a chat reply's thinking apart from its content."""

    max_n: int = MAX_N
    max_tokens: int | None = None
    trust_chat_template: bool = False
    force_usage: bool = False
    reasoning_parser: str | None = None
    prompt_tokens_details: bool = False  # the usage says how many prompt tokens the prefix cache held


MAX_PROMPTS = 256  # prompts in one completions request


def completion_prompts(body: CompletionRequest, inputs: InputProcessor) -> list[tuple[list[int], str]]:
    """``prompt``: a string (tokenized as the tokenizer does by default), a list of token ids, or
    a list of either (a batch: one set of choices per prompt). Each prompt's token ids and its
    text (as given, or the ids decoded), for ``echo``."""
    prompt = body.prompt
    batch = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
    if not 1 <= len(batch) <= MAX_PROMPTS:
        raise APIError(400, f"give between 1 and {MAX_PROMPTS} prompts, got {len(batch)}", param="prompt")
    out = []
    for one in batch:
        try:
            ids = inputs.encode(one, add_special_tokens=body.add_special_tokens is not False)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        ids = truncated(ids, body.truncate_prompt_tokens)
        out.append((ids, one if isinstance(one, str) else inputs.tokenizer.decode(ids)))
    return out


def truncated(ids: list[int], keep: int | None) -> list[int]:
    """``truncate_prompt_tokens``: the prompt's last ``keep`` tokens (vLLM's left truncation)."""
    if keep is None:
        return ids
    if keep < 1:
        raise APIError(400, f"truncate_prompt_tokens must be at least 1, got {keep}", param="truncate_prompt_tokens")
    return ids[-keep:]


# what apply_chat_template takes for itself: not template variables
TEMPLATE_ARGUMENTS = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                      "continue_final_message", "tokenize", "return_dict", "tokenizer_kwargs", "return_tensors",
                      "padding", "truncation", "max_length", "return_assistant_tokens_mask"}


def message_text(content) -> str | None:
    """Message content as the chat template expects it: a string (text parts joined)."""
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"only text content parts are supported, got type {part.get('type')!r}",
                           param="messages")
        parts.append(part["text"])
    return "".join(parts)


def chat_prompt_ids(body: ChatCompletionRequest, inputs: InputProcessor, trust_template: bool = False) -> list[int]:
    """The chat template applied to ``messages``, with the tools offered (``tools.offered``) and
    the request's template controls; truncated by ``truncate_prompt_tokens``. A request's own
    ``chat_template`` needs ``trust_template`` (``--trust-request-chat-template``)."""
    if not body.messages:
        raise APIError(400, "messages is empty: give at least one message", param="messages")
    if body.chat_template is not None and not trust_template:
        raise APIError(400, "chat_template in a request needs a server started with --trust-request-chat-template",
                       param="chat_template")
    if body.continue_final_message and body.add_generation_prompt:
        raise APIError(400, "continue_final_message continues the last message: it cannot be set with "
                            "add_generation_prompt (default true), which opens a new one", param="continue_final_message")
    kwargs = dict(body.chat_template_kwargs or {})
    clash = sorted(TEMPLATE_ARGUMENTS & set(kwargs))
    if clash:
        raise APIError(400, f"chat_template_kwargs cannot set {', '.join(clash)}: give them as request fields",
                       param="chat_template_kwargs")
    messages = [{**m.model_dump(exclude_none=True), "content": message_text(m.content) or ""} for m in body.messages]
    offered = tools.offered(body)
    if offered is not None and not inputs.template_takes_tools:
        raise APIError(400, "this model's chat template does not support tools; start the server with "
                            "--chat-template naming one that does (tensorpar ships serve/templates/"
                            "hermes_tools.jinja for ChatML models)", param="tools")
    try:
        ids = inputs.encode_messages(tools.template_messages(messages), tools=offered,
                                     add_generation_prompt=body.add_generation_prompt is not False,
                                     continue_final_message=bool(body.continue_final_message),
                                     chat_template=body.chat_template, documents=body.documents, **kwargs)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    except Exception as e:  # the template rejects these messages (roles out of order, ...)
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
    return truncated(ids, body.truncate_prompt_tokens)


def bad_word_ids(words: list[str] | None, tokenizer) -> tuple[tuple[int, ...], ...]:
    """``bad_words`` as token sequences: each word alone and after a space (how it appears mid-text)."""
    out = []
    for word in words or []:
        for text in dict.fromkeys((word, word if word.startswith(" ") else " " + word)):
            ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            if ids and ids not in out:
                out.append(ids)
    return tuple(out)


def _too_long(e: ContextLengthError, param: str) -> APIError:
    """OpenAI's wording of a context-length error."""
    if e.asked is None:
        msg = (f"This model's maximum context length is {e.limit} tokens. However, your {param} resulted in "
               f"{e.prompt} tokens, which leaves no room for a completion. Please reduce the length of the {param}.")
    else:
        msg = (f"This model's maximum context length is {e.limit} tokens. However, you requested "
               f"{e.prompt + e.asked} tokens ({e.prompt} in the {param}, {e.asked} in the completion). Please reduce "
               f"your {param} or completion length.")
    return APIError(400, msg, param=param if e.asked is None else "max_tokens", code="context_length_exceeded")


def max_new_tokens(asked: int | None, default: int | None, prompt_len: int, inputs: InputProcessor, param: str,
                   limit: int | None = None, echo: bool = False) -> int:
    """The completion budget: ``asked``, else ``default``, else what fits (at most the chat
    default); never more than the server's ``limit``. 0 is allowed with ``echo`` (the prompt
    alone, as evaluation harnesses ask for it)."""
    if asked is not None and asked < (0 if echo else 1):
        raise APIError(400, f"max_tokens must be at least {0 if echo else 1}, got {asked}", param="max_tokens")
    if asked is not None and limit is not None and asked > limit:
        raise APIError(400, f"max_tokens is {asked}, but this server generates at most {limit} tokens per "
                            "request", param="max_tokens")
    try:
        inputs.check_length(prompt_len, asked)
    except ContextLengthError as e:
        raise _too_long(e, param) from None
    room = inputs.max_model_len - prompt_len
    if asked is None:
        budget = min(default, room) if default is not None else min(CHAT_DEFAULT_MAX_TOKENS, room)
        return budget if limit is None else min(budget, limit)
    return asked


def _constraints(body: SamplingFields) -> list[tuple[str, str, object]]:
    """Each structured-output field set in ``body``: (param, ``GuidedDecoding`` kind, value)."""
    out = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        out.append(("response_format", "json_object", None))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                           param="response_format")
        out.append(("response_format", "json_schema", rf.json_schema.json_schema))
    for kind, name in (("json_schema", "guided_json"), ("regex", "guided_regex"), ("choice", "guided_choice"),
                       ("grammar", "guided_grammar")):
        if getattr(body, name) is not None:
            out.append((name, kind, getattr(body, name)))
    so = body.structured_outputs
    if so is not None:
        given = [(kind, value) for kind, value in (("json_schema", so.json_), ("regex", so.regex),
                                                   ("choice", so.choice), ("grammar", so.grammar)) if value is not None]
        given += [("json_object", None)] if so.json_object else []
        if len(given) != 1:
            raise APIError(400, "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                           param="structured_outputs")
        out.append(("structured_outputs", *given[0]))
    return out


def guided_decoding(body: SamplingFields) -> GuidedDecoding | None:
    """The constraint on the output that ``body`` asks for (at most one: ``response_format``,
    ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``,
    ``structured_outputs``, or in chat a required tool call); a 400 naming the field when it is
    invalid or when several are given."""
    asked = _constraints(body)
    forced = tools.forced_calls(body) if isinstance(body, ChatCompletionRequest) else None
    if forced is not None:
        asked.append(("tool_choice", "grammar", forced))
    if len(asked) > 1:
        raise APIError(400, f"give at most one constraint on the output, got {', '.join(p for p, _, _ in asked)}",
                       param=asked[1][0])
    if not asked:
        return None
    param, kind, value = asked[0]
    if isinstance(value, GuidedDecoding):
        return value
    try:
        return GuidedDecoding(kind, value)
    except ValueError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None


def serve_requests(body: SamplingFields, request_id: str, prompt_ids: list[int], max_tokens: int,
                   logprobs: int, max_n: int = MAX_N, prompt_logprobs: int | None = None,
                   vocab_size: int = 1 << 31, defaults: dict | None = None, tokenizer=None) -> list[Request]:
    """``n`` requests ``{request_id}-{i}`` (``requests_for``: with a seed, choice i samples with
    ``seed + i``); ``prompt_logprobs``: see ``SamplingParams``; ``guided``: ``guided_decoding``.
    ``defaults``: the server's values of sampling fields the body leaves out (``--generation-config``;
    else OpenAI's: temperature 1, top_p 1). ``tokenizer``: for ``bad_words``."""
    body = with_defaults(body, defaults or {})
    n = 1 if body.n is None else body.n
    if not 1 <= n <= max_n:
        raise APIError(400, f"n must be between 1 and {max_n}, got {n}", param="n")
    t = 1.0 if body.temperature is None else body.temperature
    if not 0 <= t <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {t}", param="temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 <= top_p <= 1:
        raise APIError(400, f"top_p must be between 0 and 1, got {top_p}", param="top_p")
    if top_p == 0:  # only the most likely token: greedy
        t, top_p = 0.0, 1.0
    if body.seed is not None and not -(1 << 63) <= body.seed < (1 << 63):
        raise APIError(400, f"seed must fit in 64 bits (from -2^63 to 2^63 - 1), got {body.seed}", param="seed")
    top_k = body.top_k or 0
    if top_k < -1:
        raise APIError(400, f"top_k must be -1 or 0 (disabled) or positive, got {top_k}", param="top_k")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bias = []
    for key, value in (body.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias maps token ids to biases from -100 to 100, got {key!r}: {value!r}",
                           param="logit_bias")
        bias.append((int(key), float(value)))
    allowed = body.allowed_token_ids
    if allowed is not None and (not allowed or any(not 0 <= t < vocab_size for t in allowed)):
        raise APIError(400, f"allowed_token_ids must be a non-empty list of token ids from 0 to {vocab_size - 1}",
                       param="allowed_token_ids")
    if body.bad_words and tokenizer is None:
        raise APIError(400, "bad_words needs the model's tokenizer, and this model ships none", param="bad_words")
    controls = dict(presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                    repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                    min_p=body.min_p or 0.0, logit_bias=tuple(bias), stop_token_ids=tuple(body.stop_token_ids or ()),
                    min_tokens=body.min_tokens or 0, guided=guided_decoding(body),
                    allowed_token_ids=tuple(allowed or ()), bad_words=bad_word_ids(body.bad_words, tokenizer),
                    include_stop_str_in_output=bool(body.include_stop_str_in_output))
    try:
        sp = SamplingParams(max_new_tokens=max_tokens, temperature=t, top_p=top_p, top_k=max(top_k, 0),
                            seed=body.seed, stop=tuple(stop), ignore_eos=bool(body.ignore_eos), n=n,
                            logprobs=logprobs, prompt_logprobs=prompt_logprobs, **controls)
    except ValueError as e:  # SamplingParams names the field first
        raise APIError(400, str(e), param=str(e).split()[0]) from None
    return requests_for(request_id, prompt_ids, sp)


DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def with_defaults(body: SamplingFields, defaults: dict) -> SamplingFields:
    """``body`` with each of ``DEFAULTABLE`` it leaves out taken from ``defaults``."""
    missing = {k: defaults[k] for k in DEFAULTABLE if k in defaults and getattr(body, k) is None}
    return body.model_copy(update=missing) if missing else body


def default_max_tokens(fallback: int | None, defaults: dict) -> int | None:
    """The completion budget of a request that gives none: the server's ``max_new_tokens``
    (``--generation-config``), else ``fallback``."""
    return defaults.get("max_new_tokens", fallback)


def refuse_unsupported(body: SamplingFields) -> None:
    """A 400 naming the first field that would change the output but is not implemented."""
    for name, value in (body.model_extra or {}).items():
        if name in REFUSED and value is not None and value not in REFUSED[name]:
            raise APIError(400, f"{name} is not supported by this server yet", param=name)


def stream_usage(body: SamplingFields, limits: Limits) -> tuple[bool, bool]:
    """(a stream ends with a usage chunk, every chunk carries the usage so far), from
    ``stream_options`` (only with ``stream``, as vLLM says) and the server's ``force_usage``."""
    options = body.stream_options
    if options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream set to true", param="stream_options")
    include = bool(body.stream) and (limits.force_usage or bool(options and options.include_usage))
    return include, include and bool(options and options.continuous_usage_stats)


def check_prompt_logprobs(body: SamplingFields) -> None:
    """``prompt_logprobs``: 0 to ``MAX_LOGPROBS`` top ones, on a reply returned whole."""
    check_top_n(body.prompt_logprobs, "prompt_logprobs")
    if body.prompt_logprobs is not None and body.stream:
        raise APIError(400, "prompt_logprobs is returned with whole replies only: leave out stream",
                       param="prompt_logprobs")


def check_top_n(value: int | None, param: str) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise APIError(400, f"{param} must be between 0 and {MAX_LOGPROBS}, got {value}", param=param)
