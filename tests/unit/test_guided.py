"""Guided decoding (``tensorpar.runtime.guided``) on SmolLM2's real tokenizer: decoding is
simulated by drawing, at each step, a seeded random token from random logits after ``mask_``, until
the grammar is complete and an end-of-sequence token comes; the text must then meet the constraint
(JSON schemas checked with ``jsonschema_rs``, a full validator)."""

from __future__ import annotations

import json
import pickle
import re

import jsonschema_rs
import pytest
import torch

from tensorpar.runtime.guided import GuidedCompiler, GuidedDecoding
from tensorpar.runtime.sampling import SamplingParams

PADDED = 64  # an LM head padded past the tokenizer's vocabulary


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Rows of 49k logits are cheaper on one thread than on threads contending for busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def decode(compiler, tokenizer, guided: GuidedDecoding, seed: int, max_steps: int = 300) -> str:
    """Random decoding under ``guided``: each step's token drawn from softmax(random logits) after
    ``mask_``, then ``accept``ed; stops at an end-of-sequence token."""
    state = compiler.start(guided)
    eos = set(compiler.tokenizer.eos_tokens)
    gen = torch.Generator().manual_seed(seed)
    vocab = compiler.tokenizer.vocab_size
    out = []
    for _ in range(max_steps):
        row = 3 * torch.randn(vocab + PADDED, generator=gen)
        state.mask_(row)
        assert torch.isneginf(row[vocab:]).all()
        if state.finished:
            assert set(torch.isfinite(row).nonzero().flatten().tolist()) <= eos
        token = int(torch.multinomial(row.softmax(-1), 1, generator=gen))
        assert state.accept(token), state.error
        if token in eos:
            assert state.finished
            return tokenizer.decode(out)
        out.append(token)
    raise AssertionError(f"no end within {max_steps} tokens: {tokenizer.decode(out)!r}")


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "mid", "high"]},
                                      "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["ok", "level", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False},
        "label": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]}},
     "required": ["point", "label"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 4},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "flags", "nested", "array"])
def test_json_schema_outputs_validate(compiler, tokenizer, schema):
    guided = GuidedDecoding("json_schema", schema)
    validator = jsonschema_rs.validator_for(schema)
    for seed in range(5):
        text = decode(compiler, tokenizer, guided, seed)
        value = json.loads(text)
        assert validator.is_valid(value), (text, list(validator.iter_errors(value)))


def test_properties_come_in_the_schemas_order(compiler, tokenizer):
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    text = decode(compiler, tokenizer, GuidedDecoding("json_schema", json.dumps(schema)), 0)
    assert list(json.loads(text)) == ["zeta", "alpha"] and text.startswith('{"zeta": ')  # readable separators


def test_regex_choice_and_grammar(compiler, tokenizer):
    pattern = r"[A-Z]{2}-[0-9]{3}( (ok|fail))?"  # Rust's \d is any Unicode digit
    for seed in range(5):
        assert re.fullmatch(pattern, decode(compiler, tokenizer, GuidedDecoding("regex", pattern), seed))
    options = ["red", "green", "blue sky", "Rot"]
    got = {decode(compiler, tokenizer, GuidedDecoding("choice", options), seed) for seed in range(8)}
    assert got <= set(options) and len(got) > 1
    grammar = 'start: sum\nsum: NUM (" + " NUM)*\nNUM: /[1-9][0-9]?/'
    for seed in range(5):
        text = decode(compiler, tokenizer, GuidedDecoding("grammar", grammar), seed)
        assert re.fullmatch(r"[1-9][0-9]?( \+ [1-9][0-9]?)*", text), text


def test_any_json_object_accepts_a_real_object_token_by_token(compiler, tokenizer):
    state = compiler.start(GuidedDecoding("json_object"))
    row = torch.zeros(compiler.tokenizer.vocab_size)
    state.mask_(row)
    allowed = {tokenizer.decode([t]) for t in torch.isfinite(row).nonzero().flatten().tolist()}
    assert allowed and all(s.startswith("{") for s in allowed)  # an object, nothing before it
    for token in tokenizer('{"a": [1, 2], "b": {"c": null}}')["input_ids"]:
        assert state.accept(token), state.error
    assert state.finished
    assert state.accept(tokenizer.eos_token_id)


def test_speculative_drafts_are_cut_where_the_grammar_forbids_and_masked_ahead(compiler, tokenizer):
    state = compiler.start(GuidedDecoding("json_object"))
    good = tokenizer('{"a": [1, 2]}')["input_ids"]
    bad = good[:3] + tokenizer("hello")["input_ids"]
    assert state.valid_prefix(good) == len(good) and state.valid_prefix(bad) == 3 and state.valid_prefix([]) == 0
    row, later = torch.zeros(compiler.tokenizer.vocab_size), torch.zeros(compiler.tokenizer.vocab_size)
    state.mask_(row)
    with state.ahead(good[:2]) as ahead:  # the mask at the third position of the drafts
        ahead.mask_(later)
    assert not torch.equal(torch.isfinite(row), torch.isfinite(later))
    assert torch.isfinite(later[good[2]]) and not torch.isfinite(row[good[2]])
    again = torch.zeros(compiler.tokenizer.vocab_size)
    state.mask_(again)  # back where it was: nothing consumed
    assert torch.equal(torch.isfinite(again), torch.isfinite(row))
    for token in good:
        assert state.accept(token), state.error


def test_a_forbidden_token_is_refused_and_only_eos_stays_allowed(compiler, tokenizer):
    state = compiler.start(GuidedDecoding("choice", ["yes", "no"]))
    assert not state.accept(tokenizer("maybe")["input_ids"][0])
    assert state.error and state.finished
    row = torch.randn(compiler.tokenizer.vocab_size + PADDED)
    state.mask_(row)
    assert set(torch.isfinite(row).nonzero().flatten().tolist()) == set(compiler.tokenizer.eos_tokens)
    assert not state.accept(tokenizer("yes")["input_ids"][0])


def test_when_other_controls_leave_nothing_allowed_the_grammar_wins(compiler, tokenizer):
    state = compiler.start(GuidedDecoding("choice", ["yes"]))
    for token in tokenizer("yes")["input_ids"]:
        assert state.accept(token)
    row = torch.randn(compiler.tokenizer.vocab_size)
    row[tokenizer.eos_token_id] = float("-inf")  # as min_tokens holds EOS back
    state.mask_(row)
    assert torch.isfinite(row).nonzero().flatten().tolist() == [tokenizer.eos_token_id]


def test_compiled_grammars_are_cached_and_the_least_recent_dropped(tokenizer):
    compiler = GuidedCompiler(tokenizer, cache_size=2)
    a, b, c = (GuidedDecoding("regex", p) for p in ("a+", "b+", "c+"))
    first = compiler.compile(a)
    assert compiler.compile(GuidedDecoding("regex", "a+")) is first
    compiler.compile(b)
    compiler.compile(a)  # now b is the least recently used
    compiler.compile(c)
    assert list(compiler._compiled) == [a, c]
    s1, s2 = compiler.start(a), compiler.start(a)  # each sequence advances its own copy
    assert s1.accept(tokenizer("a")["input_ids"][0]) and not s1.finished and not s2.matcher.is_accepting()


def test_the_end_of_sequence_tokens_are_the_runtimes(tokenizer):
    compiler = GuidedCompiler(tokenizer, eos_ids={0, 2})
    state = compiler.start(GuidedDecoding("choice", ["a"]))
    state.accept(tokenizer("a")["input_ids"][0])
    row = torch.zeros(compiler.tokenizer.vocab_size)
    state.mask_(row)
    assert torch.isfinite(row).nonzero().flatten().tolist() == [0, 2]


@pytest.mark.parametrize("kind, value, words", [
    ("json_schema", {"type": "objekt"}, "invalid JSON schema: Invalid type: objekt"),
    ("json_schema", '{"type": "string", "pattern": "a(b"}', "invalid JSON schema: regex parse error: unclosed group"),
    ("json_schema", "{not json", "invalid JSON schema: not JSON"),
    ("json_schema", [1, 2], "a schema is a JSON object"),
    ("json_schema", {"$ref": "#/definitions/missing"}, "invalid JSON schema"),
    ("regex", "a(b", 'invalid regex "a(b": regex parse error: unclosed group'),
    ("regex", "", "invalid regex"),
    ("choice", [], "invalid choice"),
    ("choice", "yes", "invalid choice"),
    ("grammar", "start: missing_rule", 'invalid grammar: at 1(8): unknown name: "missing_rule"'),
    ("xml", "<a/>", "kind must be one of"),
])
def test_bad_constraints_raise_one_line_value_errors(kind, value, words):
    with pytest.raises(ValueError) as e:
        GuidedDecoding(kind, value)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_guided_params_are_hashable_picklable_and_control_the_logits():
    guided = GuidedDecoding("json_schema", {"type": "object", "properties": {"a": {"type": "integer"}}})
    assert guided == GuidedDecoding("json_schema", '{"type": "object", "properties": {"a": {"type": "integer"}}}')
    assert pickle.loads(pickle.dumps(guided)) == guided and hash(guided) == hash(pickle.loads(pickle.dumps(guided)))
    assert GuidedDecoding("choice", ["a", "b"]).value == ("a", "b")
    sp = SamplingParams(guided=guided)
    assert sp.controls_logits and not SamplingParams().controls_logits
    assert all(c.guided == guided for c in SamplingParams(n=2, guided=guided).choices())
    with pytest.raises(ValueError, match="guided must be a GuidedDecoding"):
        SamplingParams(guided={"type": "json_object"})
