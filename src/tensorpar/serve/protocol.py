"""Request bodies of the OpenAI API and vLLM's extensions, as far as tensorpar serves them.

What becomes of each field vLLM takes (served here, accepted as output-neutral, or refused with a
400 naming it unless it has a value that changes nothing) is listed in ``fields``. ``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``,
``allowed_token_ids``, ``bad_words``, ``include_stop_str_in_output``, ``truncate_prompt_tokens``,
the structured-output fields ``guided_json``, ``guided_regex``, ``guided_choice``,
``guided_grammar`` and ``structured_outputs``, and chat's template controls are vLLM's
extensions. ``model`` may be left out: it then means the one model served.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class JSONSchemaFormat(_Body):
    """``response_format.json_schema``: the schema under ``schema`` (``name``, ``description``
    and ``strict`` are accepted; the schema is always enforced)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or
    ``json_schema`` (JSON valid under ``json_schema.schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs``: one of ``json`` (a schema), ``regex``, ``choice``,
    ``grammar`` (Lark), ``json_object``."""

    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StreamOptions(_Body):
    """``include_usage``: a last chunk with the usage; ``continuous_usage_stats`` (vLLM's): the
    usage so far on every chunk too."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(_Body):
    model_config = ConfigDict(extra="allow")  # to tell refused fields (``fields.REFUSED``) from others
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
    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    allowed_token_ids: list[int] | None = None  # the only tokens that may be generated
    bad_words: list[str] | None = None  # words never generated (as tokens, with and without a leading space)
    include_stop_str_in_output: bool | None = False
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last this many tokens
    return_token_ids: bool | None = False  # the prompt's token ids and each choice's generated ones
    prompt_logprobs: int | None = None  # each prompt token's log-probability, with this many top ones
    return_tokens_as_token_ids: bool | None = False  # log-probability entries name tokens "token_id:N"


class CompletionRequest(SamplingFields):
    """POST /v1/completions: ``prompt`` is a string or a list of token ids, or a list of either
    (a batch: ``n`` choices per prompt, prompt-major)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None  # how many top log-probabilities per token
    echo: bool | None = False  # the prompt before the completion (with logprobs: the prompt tokens' too)
    best_of: int | None = None
    add_special_tokens: bool | None = True  # a text prompt tokenized with the tokenizer's special tokens (BOS)


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object (None: no arguments)
    strict: bool | None = None


class Tool(_Body):
    """One entry of ``tools``: a function the model may call."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    """``tool_choice`` naming the one function the model must call."""

    type: Literal["function"]
    function: FunctionName


class ChatMessage(BaseModel):
    """One message; extra keys (``name``, ``tool_calls``, ``tool_call_id``, ...) pass through to
    the chat template."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    echo: bool | None = False  # the reply starts with the last message's content when that is the assistant's
    add_generation_prompt: bool | None = True  # open the assistant's turn after the messages
    continue_final_message: bool | None = False  # leave the last message open: the reply continues it
    chat_template: str | None = None  # this request's own template (a server started to trust them)
    chat_template_kwargs: dict | None = None  # more variables for the template (``enable_thinking``, ...)
    documents: list[dict] | None = None  # for templates that render retrieved documents
    include_reasoning: bool | None = True  # with a reasoning parser: the thinking as ``reasoning``


class TokenizeRequest(_Body):
    """POST /tokenize (vLLM's): a ``prompt`` as completions take it (with the tokenizer's special
    tokens unless ``add_special_tokens`` is false), or chat ``messages`` with chat's template
    controls; ``return_token_strs``: each token's string too."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = False
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None
    tools: list[Tool] | None = None


class UpdateWeightsRequest(_Body):
    """POST /update_weights_from_disk (SGLang's): the checkpoint whose weights replace the served ones."""

    model_path: str
    load_format: str | None = None


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's)."""

    model: str | None = None
    tokens: list[int]
