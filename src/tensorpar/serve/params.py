"""From a validated request body to prompt token ids and ``ServeRequest``: every check that
needs the engine's limits, each failing as a 400 that names the parameter and the numbers."""

from __future__ import annotations

from tensorpar.runtime.sampling import SamplingParams
from tensorpar.runtime.serving import ServeRequest
from tensorpar.serve.errors import APIError
from tensorpar.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

MAX_N = 32  # choices per request
MAX_LOGPROBS = 20  # top log-probabilities per token
COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI
CHAT_DEFAULT_MAX_TOKENS = 1024  # chat default: what fits in the context, at most this


def completion_prompt_ids(body: CompletionRequest, tokenizer, vocab_size: int) -> list[int]:
    """``prompt``: a string (tokenized as the tokenizer does by default), a list of token ids, or a
    list holding one of either."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"batched prompts are not supported ({len(prompt)} given): send one prompt per "
                                "request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt)["input_ids"]) if prompt else []
    else:
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab_size}): {bad[:5]}", param="prompt")
    if not ids:
        raise APIError(400, "the prompt is empty: give at least one token", param="prompt")
    return ids


def _text(content) -> str | None:
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


def chat_prompt_ids(body: ChatCompletionRequest, tokenizer) -> list[int]:
    if not body.messages:
        raise APIError(400, "messages is empty: give at least one message", param="messages")
    messages = [{**m.model_dump(exclude_none=True), "content": _text(m.content) or ""} for m in body.messages]
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # the template rejects these messages (roles out of order, ...)
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
    if not ids:
        raise APIError(400, "the messages make an empty prompt", param="messages")
    return list(ids)


def _too_long(limit: int, prompt: int, asked: int | None, param: str) -> APIError:
    if asked is None:
        msg = (f"This model's maximum context length is {limit} tokens. However, your {param} resulted in "
               f"{prompt} tokens, which leaves no room for a completion. Please reduce the length of the {param}.")
    else:
        msg = (f"This model's maximum context length is {limit} tokens. However, you requested {prompt + asked} "
               f"tokens ({prompt} in the {param}, {asked} in the completion). Please reduce your {param} or "
               "completion length.")
    return APIError(400, msg, param=param if asked is None else "max_tokens", code="context_length_exceeded")


def max_new_tokens(asked: int | None, default: int | None, prompt_len: int, max_model_len: int, param: str) -> int:
    """The completion budget: ``asked``, else ``default``, else what fits (at most the chat default)."""
    if asked is not None and asked < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {asked}", param="max_tokens")
    room = max_model_len - prompt_len
    if room < 1:
        raise _too_long(max_model_len, prompt_len, asked, param)
    if asked is None:
        return min(default, room) if default is not None else min(CHAT_DEFAULT_MAX_TOKENS, room)
    if asked > room:
        raise _too_long(max_model_len, prompt_len, asked, param)
    return asked


def serve_requests(body: SamplingFields, request_id: str, prompt_ids: list[int], max_tokens: int,
                   logprobs: int) -> list[ServeRequest]:
    """``n`` requests ``{request_id}-{i}``; with a seed, choice ``i`` samples with ``seed + i``."""
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {n}", param="n")
    t = 1.0 if body.temperature is None else body.temperature
    if not 0 <= t <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {t}", param="temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 <= top_p <= 1:
        raise APIError(400, f"top_p must be between 0 and 1, got {top_p}", param="top_p")
    if top_p == 0:  # only the most likely token: greedy
        t, top_p = 0.0, 1.0
    top_k = body.top_k or 0
    if top_k < -1:
        raise APIError(400, f"top_k must be -1 or 0 (disabled) or positive, got {top_k}", param="top_k")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    out = []
    for i in range(n):
        seed = None if body.seed is None else body.seed + i
        try:
            sp = SamplingParams(max_new_tokens=max_tokens, temperature=t, top_p=top_p, top_k=max(top_k, 0),
                                seed=seed, stop=tuple(stop), ignore_eos=bool(body.ignore_eos))
        except ValueError as e:
            raise APIError(400, str(e)) from None
        out.append(ServeRequest(f"{request_id}-{i}", list(prompt_ids), sp, logprobs=logprobs))
    return out


def check_top_n(value: int | None, param: str) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise APIError(400, f"{param} must be between 0 and {MAX_LOGPROBS}, got {value}", param=param)
