"""Guided decoding: output held to a JSON schema, a regular expression, a choice of strings or a
grammar, with llguidance.

Three pieces, from the request to the sampler:

- ``GuidedDecoding``: what a request asks for (frozen and hashable: a cache key). It is checked
  when built, so a bad schema or regex is a ``ValueError`` before anything runs.
- ``GuidedCompiler``: one per tokenizer. It holds llguidance's view of the vocabulary (built on
  first use, about 0.3 s) and the most recently used compiled grammars.
- ``GuidedState``: one per sequence. For each generated token, ``mask_(row)`` before the choice
  sets the logits of the tokens the grammar forbids to -inf, and ``accept(token)`` after it
  advances the grammar. Once the grammar is complete (``finished``) only an end-of-sequence
  token is allowed, so the sequence ends.

In the scheduler::

    compiler = GuidedCompiler(tokenizer, eos_ids)      # once
    state = compiler.start(params.guided)              # per sequence
    state.mask_(logits[row])                           # per token: after the other controls,
    token = choose(logits[row])                        # before greedy or sampled choice
    state.accept(token)

JSON is generated with fixed separators (``", "`` and ``": "``) and no other whitespace, so a
model cannot spend its budget on blank space.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_WHAT = {"json_object": "JSON object", "json_schema": "JSON schema", "regex": "regex", "choice": "choice",
         "grammar": "grammar"}
_POSITION = re.compile(r"^at \d+\(\d+\): ")  # llguidance's place in the grammar text it built


@dataclass(frozen=True)
class GuidedDecoding:
    """A constraint on the generated text, one of ``KINDS``:

    - ``json_object``: any JSON object (``value`` is None);
    - ``json_schema``: JSON valid under the schema ``value`` (given as a dict or JSON text; kept
      as compact JSON text, key order preserved: properties are generated in that order);
    - ``regex``: text the regular expression ``value`` matches in full (Rust ``regex`` syntax:
      ``\\d`` is any Unicode digit, ``[0-9]`` the ASCII ones);
    - ``choice``: exactly one of the strings ``value`` (kept as a tuple);
    - ``grammar``: text of the Lark grammar ``value`` (llguidance's dialect, which may embed
      JSON schemas with ``%json {...}``).
    """

    kind: str
    value: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"guided decoding kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        value = self.value
        if self.kind == "json_object":
            value = None
        elif self.kind == "json_schema":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ValueError(f"invalid JSON schema: not JSON ({e})") from None
            if not isinstance(value, dict):
                raise ValueError(f"invalid JSON schema: a schema is a JSON object, got {type(value).__name__}")
            value = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        elif self.kind == "choice":
            if isinstance(value, str) or not value or not all(isinstance(s, str) and s for s in value):
                raise ValueError(f"invalid choice: give a non-empty list of non-empty strings, got {value!r}")
            value = tuple(value)
        elif not isinstance(value, str) or not value:
            raise ValueError(f"invalid {_WHAT[self.kind]}: give it as a non-empty string, got {value!r}")
        object.__setattr__(self, "value", value)
        _check(self)

    def grammar(self) -> str:
        """The constraint as an llguidance grammar (what ``LLMatcher`` compiles)."""
        from llguidance import LLMatcher

        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema('{"type":"object"}', defaults=JSON_OPTIONS)
        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.value, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in self.value))
        return LLMatcher.grammar_from_lark(self.value)


def _message(guided: GuidedDecoding, error: str) -> str:
    """llguidance's ``error`` about ``guided`` in one line: its first line, and the cause a regex
    error states last (the lines between echo the input and point into it). The place in the
    grammar text (``at line(column)``) is kept only for a grammar the user wrote."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()] or ["rejected"]
    first = lines[0].replace(" (in regex)", "").rstrip(":")
    if guided.kind != "grammar":
        first = _POSITION.sub("", first)
    causes = [line[len("error: "):] for line in lines[1:] if line.startswith("error: ")]
    detail = f"{first}: {causes[0]}" if causes else first
    what = f"invalid {_WHAT[guided.kind]}"
    return detail if detail.startswith(what) else f"{what}: {detail}"


def _check(guided: GuidedDecoding) -> None:
    """``ValueError`` in one line when llguidance cannot compile ``guided`` (whatever does not
    depend on the vocabulary: about a millisecond)."""
    from llguidance import LLMatcher

    try:
        error = LLMatcher.validate_grammar(guided.grammar())
    except ValueError as e:
        error = str(e)
    if error:
        raise ValueError(_message(guided, error))


class GuidedState:
    """Where one sequence stands in its grammar (see the module docstring for the calls).

    ``mask_`` keeps the logits of allowed tokens and sets all others to -inf, those past the
    tokenizer's vocabulary (a padded LM head) included. If nothing the grammar allows is left
    finite (another control removed it, such as ``min_tokens`` holding back EOS when the grammar
    is complete), the grammar wins: its allowed tokens get logit 0.
    """

    def __init__(self, matcher, vocab_size: int, eos_ids: list[int]):
        import llguidance.numpy  # not llguidance.torch: importing it sets up torch.compile (seconds)
        import torch

        self.matcher, self.vocab_size, self.eos_ids = matcher, vocab_size, eos_ids
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)  # [1, ceil(V / 32)] int32
        self.words = torch.from_numpy(self.bitmask[0])  # the same memory
        self.error: str | None = None  # set when ``accept`` was given a token the grammar forbids

    @property
    def finished(self) -> bool:
        """The grammar is complete (or broken): only an end-of-sequence token is allowed now."""
        return self.error is not None or self.matcher.is_stopped()

    def mask_(self, logits_row: "torch.Tensor") -> None:
        """Set the logits of the tokens the grammar forbids now to -inf, in place. ``logits_row``:
        [vocab] on any device, at least as long as the model's vocabulary."""
        import llguidance.numpy
        import torch

        n = min(self.vocab_size, logits_row.shape[-1])
        if self.error is None:
            llguidance.numpy.fill_next_token_bitmask(self.matcher, self.bitmask)
        else:
            self.bitmask.fill(0)
        allowed = _unpack(self.words.to(logits_row.device), n)
        if self.error is not None:
            allowed[[t for t in self.eos_ids if t < n]] = True
        if logits_row.shape[-1] > n:
            logits_row[n:] = float("-inf")
        head = logits_row[:n]
        head.masked_fill_(~allowed, float("-inf"))
        nothing_left = ~torch.isfinite(head).any()  # a tensor: no synchronisation with the device
        head.masked_fill_(allowed & nothing_left, 0.0)

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens``, in a row from here, the grammar allows (speculative drafts)."""
        return 0 if self.error is not None or not tokens else int(self.matcher.validate_tokens(list(tokens)))

    @contextmanager
    def ahead(self, tokens: list[int]):
        """For the ``with`` block, the state after ``tokens`` (as far as the grammar allows them);
        then back where it was: to mask a draft's position."""
        n = self.valid_prefix(tokens)
        if n:
            self.matcher.consume_tokens(list(tokens[:n]))
        try:
            yield self
        finally:
            if n:
                self.matcher.rollback(n)

    def accept(self, token_id: int) -> bool:
        """Advance past the chosen token. False (and ``error`` set, ``finished`` true) when the
        grammar forbids it; never raises."""
        if self.error is not None:
            return False
        if self.matcher.consume_token(int(token_id)):
            return True
        self.error = self.matcher.get_error() or f"token {token_id} is not allowed here"
        return False


def _unpack(words: "torch.Tensor", n: int) -> "torch.Tensor":
    """llguidance's bitmask (int32 words, bit j of word i: token 32 i + j) as bool [n]."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 1).flatten()[:n].bool()


class GuidedCompiler:
    """Compiles ``GuidedDecoding``s for one Hugging Face (fast) tokenizer and starts sequences on them.

    ``eos_ids``: the tokens that end a sequence (default: the tokenizer's EOS); a complete grammar
    allows each. The llguidance tokenizer is built on first use; compiled grammars are kept for the
    ``cache_size`` most recently used constraints, and each sequence starts from a copy. Safe to
    use from several threads.
    """

    def __init__(self, tokenizer, eos_ids: Iterable[int] | None = None, cache_size: int = 64):
        self.hf_tokenizer, self.cache_size = tokenizer, cache_size
        self.eos_ids = sorted(set(eos_ids)) if eos_ids else None
        self._tokenizer = None
        self._compiled: OrderedDict[GuidedDecoding, object] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        """llguidance's ``LLTokenizer`` for this vocabulary."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                if self.hf_tokenizer is None:
                    raise ValueError("guided decoding needs the model's tokenizer, and this model ships none")
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, eos_token=self.eos_ids)
                except ValueError as e:
                    raise ValueError(f"guided decoding cannot use this tokenizer: {e}") from None
            return self._tokenizer

    def compile(self, guided: GuidedDecoding):
        """An ``LLMatcher`` for ``guided`` at its start, never advanced (cached); ``ValueError``
        when it does not compile for this vocabulary."""
        from llguidance import LLMatcher

        tokenizer = self.tokenizer
        with self._lock:
            matcher = self._compiled.get(guided)
            if matcher is not None:
                self._compiled.move_to_end(guided)
                return matcher
        matcher = LLMatcher(tokenizer, guided.grammar(), log_level=0)
        if matcher.is_error():
            raise ValueError(_message(guided, matcher.get_error()))
        with self._lock:
            self._compiled[guided] = matcher
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return matcher

    def start(self, guided: GuidedDecoding) -> GuidedState:
        """A new sequence's state at the start of ``guided``'s grammar."""
        tokenizer, matcher = self.tokenizer, self.compile(guided)
        with self._lock:
            matcher = matcher.deep_copy()
        return GuidedState(matcher, tokenizer.vocab_size, list(tokenizer.eos_tokens))
