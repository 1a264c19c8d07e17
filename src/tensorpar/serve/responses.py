"""Response bodies and stream chunks in OpenAI's exact shapes, built from ``TokenEvent``.

``CompletionFormat`` (``text_completion``) and ``ChatFormat`` (``chat.completion`` /
``chat.completion.chunk``) share one interface, so one streaming loop and one collecting loop
serve both endpoints: ``opening`` (chunk sent per choice before any token: chat's role delta),
``piece`` (one event's chunks), ``full`` (the non-streaming body). Chat replies may carry tool
calls (``ChatFormat``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from tensorpar.runtime.request import TokenEvent, ranked
from tensorpar.serve import reasoning as reasoning_parser
from tensorpar.serve import tools


class TokenText:
    """Token id -> its text as OpenAI shows it in logprobs (``tokenizer.decode([id])``), cached."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.cache[token_id] = self.tokenizer.decode([token_id])
        return s


def _lp(x: float | None) -> float | None:
    """JSON has no infinities: -inf (a token masked out by top-p) is reported as -9999.0."""
    return None if x is None else (float(x) if math.isfinite(x) else -9999.0)


@dataclass
class Choice:
    """What one sequence has produced so far."""

    text: list[str] = field(default_factory=list)
    scored: list[tuple[TokenEvent, int]] = field(default_factory=list)  # (event, text offset) per token
    tokens: int = 0
    chars: int = 0  # text so far (an echoed prompt's included)
    finish_reason: str | None = None
    error: str | None = None
    prompt: list | None = None  # the prompt tokens' log-probabilities (``TokenEvent.prompt_logprobs``)
    cached_tokens: int = 0  # its prompt's tokens the prefix cache held

    def add(self, ev: TokenEvent) -> int:
        """Record an event; returns the text offset at which its text starts."""
        if ev.prompt_logprobs is not None:
            self.prompt = ev.prompt_logprobs
        if ev.cached_tokens is not None:
            self.cached_tokens = ev.cached_tokens
        offset = self.chars
        if ev.token_id is not None:
            self.tokens += 1
            self.scored.append((ev, offset))
        self.text.append(ev.text_delta)
        self.chars += len(ev.text_delta)
        if ev.finished:
            self.finish_reason, self.error = ev.finish_reason or "stop", ev.error
        return offset


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


class Format:
    """How one request's replies are written. ``prompt_ids`` (vLLM's ``return_token_ids``): per
    choice, its prompt's token ids, returned with the ids of what was generated (streamed: the
    prompt's with the first chunk, each chunk's new ids with it)."""

    chunk_object = full_object = ""
    continuous_usage = False  # every chunk carries the usage so far (``live_usage``)
    tokens_as_ids = False  # vLLM's ``return_tokens_as_token_ids``: log-probability entries named "token_id:N"
    details_every: int | None = None  # choices per prompt, when the usage details cached prompt tokens

    def __init__(self, request_id: str, model: str, token_text: TokenText, top_n: int | None, include_usage: bool,
                 prompt_ids: list[list[int]] | None = None, prompt_top: int | None = None):
        self.id, self.model, self.token_text = request_id, model, token_text
        self.top_n, self.include_usage = top_n, include_usage  # top_n None: no logprobs asked for
        self.prompt_ids, self.prompt_top = prompt_ids, prompt_top  # prompt_top: vLLM's ``prompt_logprobs``
        self.live_usage: dict | None = None  # the usage so far, on every chunk (``continuous_usage_stats``)
        self.created = int(time.time())

    def prompt_logprobs(self, prompt: list | None) -> list | None:
        """vLLM's ``prompt_logprobs``: None for the first prompt token, then per token a dict of
        the token itself and the ``prompt_top`` most likely ones, by id: ``{"logprob", "rank"
        (1 for the most likely; null for the prompt's token outside the top ones), "decoded_token"}``."""
        if self.prompt_top is None or prompt is None:
            return None
        return [None if step is None else
                {str(t): {"logprob": _lp(v), "rank": r, "decoded_token": self.token_text(t)} for t, (v, r) in step.items()}
                for step in ranked(prompt, self.prompt_top)]

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}

    def token_name(self, token_id: int) -> str:
        """How a log-probability entry names a token: its text, or ``token_id:N`` (``tokens_as_ids``),
        which tells apart tokens that are not whole characters."""
        return f"token_id:{token_id}" if self.tokens_as_ids else self.token_text(token_id)

    def usage(self, prompt_tokens: int, choices: list[Choice]) -> dict:
        """The usage, with ``prompt_tokens_details.cached_tokens`` (each prompt's once) when asked
        for (``--enable-prompt-tokens-details``)."""
        out = usage(prompt_tokens, choices)
        if self.details_every:
            cached = sum(c.cached_tokens for c in choices[:: self.details_every])
            out["prompt_tokens_details"] = {"cached_tokens": cached}
        return out

    def chunk(self, choices: list[dict], usage_: dict | None = None) -> dict:
        out = {**self._head(self.chunk_object), "choices": choices}
        if self.include_usage:
            out["usage"] = usage_ if usage_ is not None else self.live_usage
        return out

    def opening(self, index: int) -> dict | None:
        return None

    def new_choice(self, index: int) -> Choice:
        return Choice()


class CompletionFormat(Format):
    """``echo``: per choice, its prompt's text, sent before the completion (with logprobs, the
    prompt tokens' entries come first, the first token's log-probability null, as OpenAI does)."""

    chunk_object = full_object = "text_completion"

    def __init__(self, *args, echo: list[str] | None = None, **kw):
        super().__init__(*args, **kw)
        self.echo = echo
        self._sent_prompt: set[int] = set()  # choices whose prompt ids went out (``prompt_ids``)

    def new_choice(self, index: int) -> Choice:
        return Choice(chars=len(self.echo[index])) if self.echo else Choice()

    def _prompt_entries(self, prompt: list) -> list[tuple[int, float | None, list, int]]:
        """(token, log-probability, top ones, text offset) per prompt token."""
        out, offset = [], 0
        for token, logprob, top in prompt:
            out.append((token, logprob, top, offset))
            offset += len(self.token_text(token))
        return out

    def _logprobs(self, scored: list[tuple[TokenEvent, int]], prompt: list | None = None) -> dict | None:
        if self.top_n is None:
            return None
        tt = self.token_name
        entries = self._prompt_entries(prompt) if prompt else []
        entries += [(e.token_id, e.logprob, e.top_logprobs, off) for e, off in scored]
        return {
            "tokens": [tt(t) for t, _, _, _ in entries],
            "token_logprobs": [_lp(lp) for _, lp, _, _ in entries],
            # as vLLM: the token itself, then the top n (n + 1 entries where it is not among them)
            "top_logprobs": [None if lp is None else {tt(t): _lp(lp), **{tt(x): _lp(v) for x, v in top[: self.top_n]}}
                             for t, lp, top, _ in entries],
            "text_offset": [off for _, _, _, off in entries],
        }

    def opening(self, index: int) -> dict | None:
        if not self.echo or self.top_n is not None:  # with logprobs the prompt goes out with its scores
            return None
        return self.chunk([{"index": index, "text": self.echo[index], "logprobs": None, "finish_reason": None}])

    def piece(self, index: int, ev: TokenEvent, offset: int) -> list[dict]:
        if ev.prompt_logprobs is not None:
            if not self.echo:
                return []
            return [self.chunk([{"index": index, "text": self.echo[index],
                                 "logprobs": self._logprobs([], ev.prompt_logprobs), "finish_reason": None}])]
        if not ev.text_delta and not ev.finished and (ev.token_id is None or (self.top_n is None
                                                                              and self.prompt_ids is None)):
            return []
        scored = [(ev, offset)] if ev.token_id is not None else []
        finish = (ev.finish_reason or "stop") if ev.finished else None
        choice = {"index": index, "text": ev.text_delta, "logprobs": self._logprobs(scored), "finish_reason": finish}
        if self.prompt_ids is not None:
            if index not in self._sent_prompt:
                self._sent_prompt.add(index)
                choice["prompt_token_ids"] = self.prompt_ids[index]
            choice["token_ids"] = [ev.token_id] if ev.token_id is not None else []
        return [self.chunk([choice])]

    def full(self, choices: list[Choice], prompt_tokens: int) -> dict:
        echo = self.echo or [""] * len(choices)
        out = [{"index": i, "text": echo[i] + "".join(c.text),
                "logprobs": self._logprobs(c.scored, c.prompt if self.echo else None),
                "finish_reason": c.finish_reason, "prompt_logprobs": self.prompt_logprobs(c.prompt)}
               for i, c in enumerate(choices)]
        if self.prompt_ids is not None:
            for i, (choice, c) in enumerate(zip(out, choices)):
                choice.update(prompt_token_ids=self.prompt_ids[i], token_ids=[e.token_id for e, _ in c.scored])
        return {**self._head(self.full_object), "choices": out, "usage": self.usage(prompt_tokens, choices)}


class ChatFormat(Format):
    """``tool_calls``: the model was offered tools, so its text is parsed for calls
    (``tools.parse``): the message carries them as ``tool_calls`` and the text around them as
    ``content`` (None when empty); ``finish_reason`` is ``"tool_calls"`` when the reply ended by
    itself with at least one call (a reply the token budget cut keeps ``"length"``).

    Streamed, such a reply is held back and sent whole when it ends: one delta with its
    ``content`` and all its ``tool_calls`` (and the log-probabilities of all its tokens) and
    ``finish_reason``. Text that will turn out to be a call cannot be told from content before
    the call is complete, so nothing is sent early.

    ``reasoning`` (``--reasoning-parser``): the model's thinking goes out as ``reasoning`` apart
    from ``content`` (``serve.reasoning``), unless ``include_reasoning`` is off.
    """

    chunk_object, full_object = "chat.completion.chunk", "chat.completion"

    def __init__(self, *args, tool_calls: bool = False, echo: str = "", reasoning: bool = False,
                 include_reasoning: bool = True, **kw):
        super().__init__(*args, **kw)
        self.tool_calls, self.echo = tool_calls, echo  # echo: the text the reply starts with (chat ``echo``)
        self.reasoning, self.include_reasoning = reasoning, include_reasoning
        self._held: dict[int, list[TokenEvent]] = {}  # per streamed choice, its events so far
        self._splitters: dict[int, reasoning_parser.StreamSplitter] = {}

    def _entry(self, token_id: int, logprob: float | None) -> dict:
        s = self.token_name(token_id)
        return {"token": s, "logprob": _lp(logprob), "bytes": list(s.encode("utf-8"))}

    def _logprobs(self, events: list[TokenEvent]) -> dict | None:
        if self.top_n is None:
            return None
        content = [{**self._entry(e.token_id, e.logprob),
                    "top_logprobs": [self._entry(t, lp) for t, lp in e.top_logprobs[: self.top_n]]} for e in events]
        return {"content": content, "refusal": None}

    def _message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of a reply's ``text``, and its finish reason."""
        thought = {}
        if self.reasoning:
            reasoning, text = reasoning_parser.split(text)
            thought = {"reasoning": reasoning if self.include_reasoning else None}
        if not self.tool_calls:
            return {"role": "assistant", "content": text, "refusal": None, **thought}, finish_reason
        content, calls = tools.parse(text)
        message = {"role": "assistant", "content": content, "refusal": None, **thought}
        if calls:
            message["tool_calls"] = calls
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return message, finish_reason

    def opening(self, index: int) -> dict:
        chunk = self.chunk([{"index": index, "delta": {"role": "assistant", "content": "" if self.tool_calls else self.echo},
                             "logprobs": None, "finish_reason": None}])
        if self.prompt_ids is not None:
            chunk["prompt_token_ids"] = self.prompt_ids[index]
            chunk["choices"][0]["token_ids"] = []
        return chunk

    def _ids(self, choice: dict, events: list[TokenEvent]) -> dict:
        """A streamed choice with the ids of its events' tokens, when they are asked for."""
        if self.prompt_ids is not None:
            choice["token_ids"] = [e.token_id for e in events if e.token_id is not None]
        return choice

    def piece(self, index: int, ev: TokenEvent, offset: int) -> list[dict]:
        if self.tool_calls:
            return self._whole(index, ev)
        token = ev.token_id is not None and (self.top_n is not None or self.prompt_ids is not None)
        thought, text = "", ev.text_delta
        if self.reasoning:
            thought, text = self._splitters.setdefault(index, reasoning_parser.StreamSplitter()).feed(
                ev.text_delta, ev.finished)
            thought = thought if self.include_reasoning else ""
        if not (text or thought or token or ev.finished):
            return []
        lp = self._logprobs([ev]) if ev.token_id is not None and self.top_n is not None else None
        delta = {"reasoning": thought} if thought else {}
        if text or token:
            delta["content"] = text
        reason = (ev.finish_reason or "stop") if ev.finished else None  # (on the chunk with the last text, as vLLM)
        return [self.chunk([self._ids({"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason},
                                      [ev])])]

    def _whole(self, index: int, ev: TokenEvent) -> list[dict]:
        """A reply parsed for tool calls: nothing until it ends, then all of it."""
        held = self._held.setdefault(index, [])
        held.append(ev)
        if not ev.finished:
            return []
        del self._held[index]
        message, reason = self._message(self.echo + "".join(e.text_delta for e in held), ev.finish_reason or "stop")
        scored = [e for e in held if e.token_id is not None]
        delta = {"content": message["content"]}
        if message.get("reasoning"):
            delta["reasoning"] = message["reasoning"]
        if "tool_calls" in message:
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
        if not (message["content"] or message.get("reasoning") or "tool_calls" in message
                or (scored and self.top_n is not None)):
            delta = {}
        return [self.chunk([self._ids({"index": index, "delta": delta, "logprobs": self._logprobs(scored),
                                       "finish_reason": reason}, scored)])]

    def full(self, choices: list[Choice], prompt_tokens: int) -> dict:
        out = []
        for i, c in enumerate(choices):
            message, reason = self._message(self.echo + "".join(c.text), c.finish_reason)
            out.append({"index": i, "message": message, "logprobs": self._logprobs([e for e, _ in c.scored]),
                        "finish_reason": reason})
            if self.prompt_ids is not None:
                out[-1]["token_ids"] = [e.token_id for e, _ in c.scored]
        head = {**self._head(self.full_object), "choices": out, "usage": self.usage(prompt_tokens, choices),
                "prompt_logprobs": self.prompt_logprobs(choices[0].prompt if choices else None)}
        return head if self.prompt_ids is None else {**head, "prompt_token_ids": self.prompt_ids[0]}
