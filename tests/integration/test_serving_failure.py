"""A rank that dies under a serving engine: the engine turns unhealthy, names the rank, and ends
every request with an error. (Its own module: the engine of test_serving_engine.py holds this
process's process group until that module ends.)"""

from __future__ import annotations

import os
import signal
import time

import pytest
from test_serving_engine import Collector

from tensorpar import SamplingParams
from tensorpar.runtime.request import Request
from tensorpar.runtime.serving import ServingEngine


@pytest.mark.timeout(120)
def test_dead_rank_makes_the_engine_unhealthy_and_names_it(tiny_chat_checkpoint):
    eng = ServingEngine(str(tiny_chat_checkpoint), tp=2, max_num_seqs=2, progress=False)
    try:
        got = Collector()
        eng.submit(Request("a", eng.tokenizer("x")["input_ids"],
                                SamplingParams(max_new_tokens=4000, ignore_eos=True)), got)
        time.sleep(0.5)
        os.kill(eng._ranks.pids[0], signal.SIGKILL)  # rank 1
        got.wait(["a"], timeout=30)
        final = got.events["a"][-1]
        assert final.finish_reason == "error" and "rank 1" in final.error
        stats = eng.stats()
        assert not stats["healthy"] and "rank 1 of 2 failed: killed by signal SIGKILL" in stats["error"]
        late = Collector()
        eng.submit(Request("b", [1, 2, 3], SamplingParams()), late)
        assert late.events["b"][-1].finish_reason == "error"
    finally:
        eng.shutdown()
