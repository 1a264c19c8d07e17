"""Reasoning output apart from the answer (``tensorpar serve --reasoning-parser qwen3``).

Qwen3 thinks between ``<think>`` and ``</think>`` before answering; the parser returns that as
``reasoning`` beside ``content``, as vLLM's ``qwen3`` parser does:

- a whole reply (``split``): reasoning only when it holds both tags: the text between them (what
  comes before ``<think>``, and after ``</think>``, is content); otherwise all of it is content;
- a stream (``StreamSplitter``): once ``<think>`` has been generated, the text is reasoning until
  ``</think>``, then content; without ``<think>`` (thinking disabled) it is all content. The
  last characters that may begin a tag are held back until they cannot.

With ``enable_thinking: false`` (``chat_template_kwargs``) Qwen3's template closes an empty
thought in the prompt itself, so the reply is all content.
"""

from __future__ import annotations

START, END = "<think>", "</think>"
PARSERS = ("qwen3",)


def split(text: str) -> tuple[str | None, str]:
    """(reasoning, content) of a whole reply."""
    if START not in text or END not in text:
        return None, text
    before, _, after = text.partition(START)
    reasoning, _, rest = after.partition(END)
    return reasoning, before + rest


def _streamed(text: str) -> tuple[str, str]:
    """(reasoning, content) of the text so far, by the stream's rule (module docstring)."""
    if START not in text:
        return "", text
    before, _, after = text.partition(START)
    reasoning, closed, rest = after.partition(END)
    return reasoning, before + (rest if closed else "")


class StreamSplitter:
    """One streamed choice's text, fed delta by delta, out as (reasoning, content) deltas."""

    def __init__(self):
        self.text, self.sent = "", ("", "")

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        safe = len(self.text)
        if not final:  # hold back a tail that may still become a tag
            for i in range(max(0, len(self.text) - len(END) + 1), len(self.text)):
                tail = self.text[i:]
                if START.startswith(tail) or END.startswith(tail):
                    safe = i
                    break
        reasoning, content = _streamed(self.text[:safe])
        out = (reasoning[len(self.sent[0]):], content[len(self.sent[1]):])
        self.sent = (reasoning, content)
        return out
