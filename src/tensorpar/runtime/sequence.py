"""One request while it runs: its KV-cache blocks, its tokens, its random stream, its text, and when it ends.

The rules, in the order they apply to each new token:

1. an end-of-sequence token (unless ``ignore_eos``) or one of ``stop_token_ids`` (its text left
   out) ends it, reason ``stop``;
2. a stop string in the text ends it, reason ``stop``, the text cut just before the first one
   (after it with ``include_stop_str_in_output``);
3. ``max_new_tokens`` generated, or prompt + generated reaching ``max_model_len``, ends it,
   reason ``length``.

Text is detokenized incrementally by the tokenizers library's ``DecodeStream`` (a few trailing
tokens decoded per step, never the whole sequence). While a sequence runs, its streamed text
holds back what may still change: an unfinished character (the stream returns nothing for it),
and the last ``len(longest stop string) - 1`` characters, which may begin a stop string. The
concatenation of a sequence's text deltas is its text.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from tensorpar.errors import TensorparError
from tensorpar.runtime.request import Request, Sink, TokenEvent


def backend_tokenizer(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a Hugging Face tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise TensorparError(f"{type(tokenizer).__name__} has no tokenizers backend (a fast tokenizer is needed)")
    return backend


class Detokenizer:
    """Text pieces of a growing token sequence, equal in sum to ``tokenizer.decode(ids,
    skip_special_tokens=True)`` once flushed."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = backend_tokenizer(tokenizer)
        self.stream = DecodeStream(skip_special_tokens=True)
        self.pending: list[int] = []  # tokens the stream holds (an unfinished character, special tokens)

    def step(self, token: int) -> str:
        piece = self.stream.step(self.backend, token)
        if piece is None:
            self.pending.append(token)
            return ""
        self.pending.clear()
        return piece

    def flush(self) -> str:
        """The text of the held tokens, decoded as they stand (an unfinished character as U+FFFD)."""
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True) if self.pending else ""
        self.pending = []
        return text


class Sequence:
    def __init__(self, request: Request, sink: Sink, tokenizer, eos_ids: set[int], max_model_len: int):
        self.request, self.sink = request, sink
        self.blocks: list[int] = []  # its KV-cache block table (``block_manager``); empty while it waits
        self.hashes: list[int] = []  # the prefix-cache names of its full blocks
        self.cache_root = None  # where their chain of names starts (``BlockManager.admit``)
        self.guided = None  # where it stands in its grammar (``runtime.guided.GuidedState``), if it has one
        self.drafts: list[int] = []  # tokens a speculative proposer guesses follow (``runtime.speculative``)
        self.draft_probs = None  # [len(drafts), vocab]: the distributions they were drawn from (None: certain)
        self.params = request.params
        self.generator = self.params.generator()
        self.eos_ids, self.max_model_len = eos_ids, max_model_len
        self.out: list[int] = []
        self.computed = 0  # positions whose keys and values are in the cache (prefill runs in chunks)
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.text = ""  # detokenized so far (cut at a stop string once one is found)
        self.cached_tokens: int | None = None  # prompt tokens found in the prefix cache when it started
        self.admitted_at: float | None = None  # when it started running (``time.perf_counter``)
        self.sent = 0  # characters of text already in events
        self.hold = max((len(s) - 1 for s in self.params.stop), default=0)
        self.finish_reason: str | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def length(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.out)

    @property
    def tokens(self) -> list[int]:
        """Prompt and generated tokens."""
        return self.request.prompt_token_ids + self.out

    @property
    def decoding(self) -> bool:
        """Has its first token, and every position before the last one cached: its next step is
        one decode token (else it prefills: its prompt, or after a preemption all it had)."""
        return bool(self.out) and self.computed == self.length - 1

    @property
    def last_token(self) -> int:
        return self.out[-1] if self.out else self.request.prompt_token_ids[-1]

    def append(self, token: int, logprob: float | None = None, top: list[tuple[int, float]] | None = None) -> None:
        """Take the next token: apply the rules (``finish_reason`` is set when one ends the
        sequence) and send the token's event."""
        self.out.append(token)
        p = self.params
        stop_token = token in p.stop_token_ids
        reason = "stop" if (token in self.eos_ids and not p.ignore_eos) or stop_token else None
        if reason is None and (len(self.out) >= p.max_new_tokens or self.length >= self.max_model_len):
            reason = "length"
        if self.detokenizer is not None:
            start = max(0, len(self.text) - self.hold)  # where a stop string ending in the new text may begin
            if not stop_token:  # a stop token's own text is left out (as vLLM does)
                self.text += self.detokenizer.step(token)
            if reason is not None:
                self.text += self.detokenizer.flush()
            hits = [(i, i + len(s)) for i, s in ((self.text.find(s, start), s) for s in p.stop) if i >= 0]
            if hits:
                at, end = min(hits)
                self.text, reason = self.text[: end if p.include_stop_str_in_output else at], "stop"
        self.finish_reason = reason
        ready = len(self.text) if reason is not None else len(self.text) - self.hold
        delta = self.text[self.sent : ready] if ready > self.sent else ""
        self.sent += len(delta)
        first = len(self.out) == 1
        self.sink(TokenEvent(self.request_id, token, delta, logprob, top or [],
                             cached_tokens=self.cached_tokens if first else None,
                             admitted_at=self.admitted_at if first else None))

    def replay(self, tokens: list[int]) -> None:
        """Take ``tokens`` as generated and already sent (``Request.emitted``): its grammar, text
        and end rules advance as they did, and no event is sent."""
        sink, self.sink = self.sink, lambda event: None
        try:
            for token in tokens:
                if self.guided is not None:
                    self.guided.accept(token)
                self.append(token)
                if self.finish_reason is not None:
                    break
        finally:
            self.sink = sink

    def end(self, reason: str, error: str | None = None) -> None:
        """Send the final event (after the token events; alone for an abort or a failure)."""
        self.sink(final_event(self.request_id, reason, error))


def final_event(request_id: str, reason: str, error: str | None = None) -> TokenEvent:
    return TokenEvent(request_id, None, "", finished=True, finish_reason=reason, error=error)
