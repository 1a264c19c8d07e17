"""Every request field of vLLM's OpenAI server on /v1/completions and /v1/chat/completions, and
what tensorpar does with it, so that none is dropped in silence:

- served: a field of the request models (``protocol``), implemented;
- ``NEUTRAL``: accepted and ignored, because it never changes the output (who asks, where a
  reply would be stored, which backend to use for the same constraint);
- ``REFUSED``: not implemented; the values listed leave the output unchanged (clients send them
  by default), any other is a 400 naming the field (``params.refuse_unsupported``).

``tests/unit/test_serve_fields.py`` checks that each field of ``VLLM_FIELDS`` has exactly one
status on each route, and sends each refused one; a field vLLM adds goes into ``VLLM_FIELDS``,
and the test then says what it still needs. A field in no list (neither OpenAI's nor vLLM's) is
ignored, as vLLM ignores it.
"""

from __future__ import annotations

_COMMON = (
    "model", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty", "response_format",
    "seed", "stop", "stream", "stream_options", "temperature", "top_p", "user", "best_of", "use_beam_search", "top_k",
    "min_p", "repetition_penalty", "length_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
    "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "prompt_logprobs", "allowed_token_ids", "bad_words", "echo", "add_special_tokens", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "structural_tag", "guided_decoding_backend", "guided_whitespace_pattern",
    "structured_outputs", "priority", "request_id", "logits_processors", "return_tokens_as_token_ids",
    "return_token_ids", "cache_salt", "kv_transfer_params", "vllm_xargs",
)
VLLM_FIELDS = {
    "completions": _COMMON + ("prompt", "suffix", "prompt_embeds"),
    "chat": _COMMON + ("messages", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
                       "parallel_tool_calls", "reasoning_effort", "include_reasoning", "add_generation_prompt",
                       "continue_final_message", "documents", "chat_template", "chat_template_kwargs",
                       "mm_processor_kwargs", "functions", "function_call", "metadata", "store", "service_tier"),
}

NEUTRAL = frozenset({
    "user", "metadata", "store", "service_tier", "request_id", "cache_salt", "guided_decoding_backend",
    "mm_processor_kwargs",
})

# field -> the values that leave the output unchanged
REFUSED: dict[str, tuple] = {
    "tools": ([],), "tool_choice": ("none", "auto"),  # (on completions; chat serves them)
    "functions": ([],), "function_call": ("none", "auto"), "suffix": ("",),
    "logits_processors": ([],), "use_beam_search": (False,), "length_penalty": (1.0,), "prompt_embeds": (),
    "best_of": (1,),  # (on chat; completions serves best_of equal to n)
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,), "add_special_tokens": (False,),
    "structural_tag": (), "guided_whitespace_pattern": (), "reasoning_effort": (), "priority": (0,),
    "kv_transfer_params": ({},), "vllm_xargs": ({},),
}
