"""ServingEngine: continuous batching over real ranks. Requests joining a busy batch get exactly
their solo greedy output (computed without prefix caching), also those whose prompt starts with
a cached prefix; aborts free their blocks; a KV budget too small for one sequence is refused; a
dead rank turns the engine unhealthy and ends every request with an error naming it."""

from __future__ import annotations

import re
import threading
import time

import pytest

from tensorpar import LLM, SamplingParams
from tensorpar.runtime.request import Request, TokenEvent
from tensorpar.runtime.serving import ServingEngine


class Collector:
    def __init__(self):
        self.events: dict[str, list[TokenEvent]] = {}
        self.done = threading.Condition()

    def __call__(self, e: TokenEvent) -> None:
        with self.done:
            self.events.setdefault(e.request_id, []).append(e)
            self.done.notify_all()

    def wait(self, ids, timeout=120) -> None:
        deadline = time.monotonic() + timeout
        with self.done:
            while not all(self.events.get(i) and self.events[i][-1].finished for i in ids):
                assert self.done.wait(max(0.0, deadline - time.monotonic())), "requests did not finish"

    def tokens(self, rid):
        return [e.token_id for e in self.events[rid] if e.token_id is not None]

    def text(self, rid):
        return "".join(e.text_delta for e in self.events[rid])


SYSTEM = ("You are a careful assistant. Answer in one short sentence, name your sources, and never guess: "
          "when you do not know, say so plainly, and keep every answer polite and brief. ")
PROMPTS = ["Once upon a time", "Tensor parallelism", "Hello", "The capital of France is", "def f(x):",
           "A B C", "One two three four five six seven", "Why?"]
PREFIXED = [SYSTEM + q for q in ("What is rain?", "Why is the sky blue?", "Who wrote Hamlet?")]


@pytest.fixture(scope="module")
def solo(tiny_chat_checkpoint):
    """Each prompt's greedy completion generated alone, in one process, every prompt computed whole."""
    with LLM(str(tiny_chat_checkpoint), tp=1, progress=False, prefix_caching=False) as llm:
        return {p: llm.generate([p], max_new_tokens=12, ignore_eos=True)[0] for p in PROMPTS + PREFIXED}


@pytest.fixture(scope="module")
def engine(tiny_chat_checkpoint):
    eng = ServingEngine(str(tiny_chat_checkpoint), tp=2, max_num_seqs=4, progress=False)
    yield eng
    eng.shutdown()


@pytest.mark.timeout(180)
def test_busy_batch_gives_each_request_its_solo_output(engine, solo):
    tok = engine.tokenizer
    got = Collector()
    ids = []
    for i in range(32):  # 32 requests, 4 slots: most wait, all join and leave at token granularity
        p = PROMPTS[i % len(PROMPTS)]
        rid = f"r{i}"
        ids.append((rid, p))
        engine.submit(Request(rid, tok(p)["input_ids"], SamplingParams(max_new_tokens=12, ignore_eos=True)), got)
        if i % 5 == 0:
            time.sleep(0.05)  # arrivals spread over running steps
    got.wait([r for r, _ in ids])
    for rid, p in ids:
        assert got.tokens(rid) == solo[p].token_ids, rid
        assert got.text(rid) == solo[p].text
        assert got.events[rid][-1].finish_reason == "length"
        assert all(e.logprob is not None and e.logprob <= 0 for e in got.events[rid][:-1])
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["healthy"]


@pytest.mark.timeout(120)
def test_prompts_sharing_a_cached_prefix_skip_its_blocks_and_get_their_solo_output(engine, solo):
    tok = engine.tokenizer
    ids = {p: tok(p)["input_ids"] for p in PREFIXED}
    shared = min(next(i for i, (a, b) in enumerate(zip(ids[PREFIXED[0]], ids[p])) if a != b) for p in PREFIXED[1:])
    assert shared >= 32  # at least two blocks of 16 in common
    before = engine.stats()
    got = Collector()
    engine.submit(Request("first", ids[PREFIXED[0]], SamplingParams(max_new_tokens=12, ignore_eos=True)), got)
    got.wait(["first"])
    for i, p in enumerate(PREFIXED[1:]):
        engine.submit(Request(f"then{i}", ids[p], SamplingParams(max_new_tokens=12, ignore_eos=True)), got)
    got.wait(["first", "then0", "then1"])
    for rid, p in zip(("first", "then0", "then1"), PREFIXED):
        assert got.tokens(rid) == solo[p].token_ids, rid
    after = engine.stats()
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    assert hits >= 2 * (shared // 16 * 16)  # the two later prompts found the shared blocks
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == sum(len(v) for v in ids.values())
    assert after["kv_cache_usage"] == 0 and after["free_blocks"] == after["kv_blocks"]


@pytest.mark.timeout(60)
def test_a_kv_budget_below_one_sequence_is_refused_before_serving(tiny_chat_checkpoint):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "tensorpar", "generate", "--model", str(tiny_chat_checkpoint), "--tp", "2",
                        "--max-model-len", "64", "--kv-cache-memory", "4096", "--prompt", "Hi"],
                       capture_output=True, text=True, timeout=50)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert re.search(r"--kv-cache-memory gives each rank 0\.0 MiB: \d+ positions of KV cache, less than one sequence "
                     r"of --max-model-len 64", r.stderr), r.stderr


@pytest.mark.timeout(120)
def test_stop_strings_hold_back_text_and_cut_it(engine, solo):
    tok = engine.tokenizer
    full = solo[PROMPTS[0]].text
    stop = full[len(full) // 2: len(full) // 2 + 4]
    got = Collector()
    engine.submit(Request("s", tok(PROMPTS[0])["input_ids"],
                               SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,), logprobs=3)), got)
    got.wait(["s"])
    assert got.text("s") == full[: full.find(stop)]
    assert got.events["s"][-1].finish_reason == "stop"
    assert all(len(e.top_logprobs) == 3 for e in got.events["s"][:-1])


@pytest.mark.timeout(120)
def test_a_request_resumed_after_its_emitted_tokens_sends_exactly_the_rest(engine):
    """``Request.emitted`` (an elastic server's resume): after k tokens already streamed, the
    events are those of the undisturbed run from token k on: the same tokens, and text deltas
    that join to the rest of its text (with a stop string holding text back, and with a regex
    grammar that the replayed tokens must advance)."""
    from tensorpar.runtime.guided import GuidedDecoding

    tok = engine.tokenizer
    prompt = tok(PROMPTS[0])["input_ids"]
    cases = {"stop": SamplingParams(max_new_tokens=16, ignore_eos=True, stop=("zzzq",)),
             "regex": SamplingParams(max_new_tokens=16, guided=GuidedDecoding("regex", "[a-z ]{16,40}"))}
    for name, params in cases.items():
        whole = Collector()
        engine.submit(Request(name, prompt, params), whole)
        whole.wait([name])
        tokens, deltas = whole.tokens(name), [e.text_delta for e in whole.events[name]]
        assert len(tokens) >= 4, tokens
        for k in (1, 3):
            got = Collector()
            rid = f"{name}-{k}"
            engine.submit(Request(rid, prompt, params, emitted=tokens[:k]), got)
            got.wait([rid])
            assert got.tokens(rid) == tokens[k:]
            assert got.text(rid) == "".join(deltas[k:])
            assert got.events[rid][-1].finish_reason == whole.events[name][-1].finish_reason
    assert engine.stats()["running"] == 0


@pytest.mark.timeout(120)
def test_abort_frees_the_blocks(engine):
    tok = engine.tokenizer
    got = Collector()
    engine.submit(Request("long", tok("x")["input_ids"], SamplingParams(max_new_tokens=2000, ignore_eos=True)), got)
    time.sleep(0.5)
    assert engine.stats()["running"] == 1
    engine.abort("long")
    got.wait(["long"])
    assert got.events["long"][-1].finish_reason == "abort"
    assert engine.stats()["running"] == 0 and engine.stats()["kv_cache_usage"] == 0
