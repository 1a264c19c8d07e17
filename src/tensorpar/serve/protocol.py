"""Request bodies of the OpenAI API, as far as tensorpar serves them.

Fields that would change the output but are not implemented (``response_format``, ``tools``,
``suffix``, guided decoding, ...: ``UNSUPPORTED``) are refused with a 400 naming them; other fields
OpenAI defines (``user``, ``metadata``, ``store``, ...) are accepted and ignored, as clients send
them by default. ``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``
and ``ignore_eos`` are extensions (as in vLLM). ``model`` may be left out: it then means the one
model served.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# field -> the values that leave the output unchanged (sent by some clients by default)
UNSUPPORTED = {"response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none", "auto"),
               "functions": ([],), "function_call": ("none", "auto"), "suffix": ("",), "guided_json": (),
               "guided_regex": (), "guided_choice": (), "guided_grammar": (), "structured_outputs": (),
               "prompt_logprobs": (), "logits_processors": ()}


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    model_config = ConfigDict(extra="allow")  # to tell unsupported fields (``UNSUPPORTED``) from others
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    logit_bias: dict[str, float] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions: ``prompt`` is a string or a list of token ids, or a list of either
    (a batch: ``n`` choices per prompt, prompt-major)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None  # how many top log-probabilities per token
    echo: bool | None = False  # the prompt before the completion (with logprobs: the prompt tokens' too)
    best_of: int | None = None


class ChatMessage(BaseModel):
    """One message; extra keys (``name``, ``tool_calls``, ...) pass through to the chat template."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = None


class TokenizeRequest(_Body):
    """POST /tokenize (vLLM's): a ``prompt`` as completions take it, or chat ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's)."""

    model: str | None = None
    tokens: list[int]
