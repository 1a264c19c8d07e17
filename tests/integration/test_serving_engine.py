"""ServingEngine: continuous batching over real ranks. Requests joining a busy batch get exactly
their solo greedy output; aborts free their slot; a dead rank turns the engine unhealthy and ends
every request with an error naming it."""

from __future__ import annotations

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


PROMPTS = ["Once upon a time", "Tensor parallelism", "Hello", "The capital of France is", "def f(x):",
           "A B C", "One two three four five six seven", "Why?"]


@pytest.fixture(scope="module")
def solo(tiny_chat_checkpoint):
    """Each prompt's greedy completion generated alone, in one process."""
    with LLM(str(tiny_chat_checkpoint), tp=1, progress=False) as llm:
        return {p: llm.generate([p], max_new_tokens=12, ignore_eos=True)[0] for p in PROMPTS}


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
def test_abort_frees_the_slot(engine):
    tok = engine.tokenizer
    got = Collector()
    engine.submit(Request("long", tok("x")["input_ids"], SamplingParams(max_new_tokens=2000, ignore_eos=True)), got)
    time.sleep(0.5)
    assert engine.stats()["running"] == 1
    engine.abort("long")
    got.wait(["long"])
    assert got.events["long"][-1].finish_reason == "abort"
    assert engine.stats()["running"] == 0
