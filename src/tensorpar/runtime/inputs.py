"""Prompts to token ids, and the checks every prompt passes before it is scheduled.

One place for ``LLM.generate``, ``tensorpar generate`` and the HTTP server: text is tokenized as
the model's Hugging Face tokenizer does by default, chat messages go through its chat template,
token ids must lie in the model's vocabulary, and prompt + completion must fit the context.
"""

from __future__ import annotations


class ContextLengthError(ValueError):
    """A prompt, with the completion asked for, does not fit in ``limit`` tokens."""

    def __init__(self, limit: int, prompt: int, asked: int | None):
        self.limit, self.prompt, self.asked = limit, prompt, asked
        if asked is None:
            msg = f"the prompt has {prompt} tokens, which leaves no room for a completion in the context of {limit}"
        else:
            msg = (f"the prompt has {prompt} tokens; with max_new_tokens={asked} that is {prompt + asked}, more "
                   f"than the context of {limit} tokens")
        super().__init__(msg)


class InputProcessor:
    """``tokenizer`` may be None (a checkpoint without one): prompts must then be token ids.
    ``chat_template``: a Jinja chat template used instead of the tokenizer's own (None: its own)."""

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, model: str = "the model",
                 chat_template: str | None = None):
        self.tokenizer, self.vocab_size, self.max_model_len, self.model = tokenizer, vocab_size, max_model_len, model
        self.chat_template = chat_template

    def _tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.model} ships no tokenizer: give prompts as lists of token ids")
        return self.tokenizer

    def encode(self, prompt: str | list[int] | list[dict], chat: bool = False, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt (as one user message with ``chat``; with the tokenizer's
        special tokens unless told not to), of chat messages (``[{"role", "content"}, ...]``) or of
        a list of token ids."""
        if prompt and isinstance(prompt, list) and isinstance(prompt[0], dict):
            return self.encode_messages(prompt)
        if not isinstance(prompt, str):
            return self.check_ids([int(t) for t in prompt])
        if chat:
            return self.encode_messages([{"role": "user", "content": prompt}])
        tok = self._tokenizer()
        ids = (tok(prompt) if add_special_tokens else tok(prompt, add_special_tokens=False))["input_ids"] if prompt else []
        return self.check_ids(list(ids))

    def encode_messages(self, messages: list[dict], tools: list[dict] | None = None, *,
                        add_generation_prompt: bool = True, continue_final_message: bool = False,
                        chat_template: str | None = None, documents: list[dict] | None = None,
                        **template_kwargs) -> list[int]:
        """The chat template applied to ``messages``, with the assistant's turn opened (or, with
        ``continue_final_message``, the last message left open to be continued); ``tools``
        (OpenAI function tools) and ``documents`` are given to the template, which lists them for
        the model, as are ``template_kwargs`` (``enable_thinking``, ...). ``chat_template``: this
        request's own instead of the server's."""
        ids = self._tokenizer().apply_chat_template(
            messages, tools=tools, documents=documents, chat_template=chat_template or self.chat_template,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            tokenize=True, return_dict=False, **template_kwargs)
        return self.check_ids(list(ids))

    @property
    def template_takes_tools(self) -> bool:
        """The chat template in use renders ``tools`` (it names them at all)."""
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None) or ""
        texts = template.values() if isinstance(template, dict) else [template]
        return any("tools" in t for t in texts)

    def check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def check_length(self, prompt_len: int, max_new_tokens: int | None) -> None:
        """``ContextLengthError`` unless the prompt and ``max_new_tokens`` (None: at least one) fit."""
        room = self.max_model_len - prompt_len
        if room < 1 or (max_new_tokens is not None and max_new_tokens > room):
            raise ContextLengthError(self.max_model_len, prompt_len, max_new_tokens)
