"""Bad degrees and unknown models are refused before any process starts, and ranks that die at
start-up fail the launch instead of hanging (a rank killed mid-generation: ``tests/faults``)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from helpers import cli


@pytest.mark.timeout(60)
def test_degree_above_head_count_is_refused_before_starting(tiny_chat_checkpoint):
    t0 = time.monotonic()
    r = cli("generate", "--model", str(tiny_chat_checkpoint), "--tp", "7", "--prompt", "hi")
    assert r.returncode == 1
    assert "tensor-parallel degree 7 is not valid" in r.stderr and "from 1 to 6" in r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model,needle", [
    ("/no/such/model", "no such model"),
    ("llama-9000b", "no such model"),
])
def test_unknown_model_gets_one_clear_line(model, needle):
    r = cli("generate", "--model", model, "--tp", "2", "--prompt", "hi")
    assert r.returncode == 1
    assert needle in r.stderr and "Traceback" not in r.stderr


NO_MAIN_GUARD = """
import sys
from tensorpar.distributed.launch import launch
# no `if __name__ == "__main__":`, so every spawned rank re-runs this and dies at start-up; the
# arguments are larger than a pipe holds, so a parent that wrote them to a dead rank would block
launch(2, "builtins:dict", (b"x" * 300_000,))
"""


@pytest.mark.timeout(120)
def test_ranks_that_die_at_start_up_fail_the_launch_instead_of_hanging(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(NO_MAIN_GUARD)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert r.returncode != 0
    assert "RankFailure" in r.stderr and "of 2 failed" in r.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.timeout(180)
def test_an_elastic_llm_runs_again_one_rank_smaller(tiny_chat_checkpoint, capfd):
    """``LLM(elastic=True)`` at tp=3: a rank SIGKILLed between calls makes the next call launch
    tp=2 and return its results (for this model, the tp=3 ones); a second shrinks to tp=1 (one
    rank: this process)."""
    import os
    import signal

    from tensorpar import LLM

    prompts = ["Elastic offline 1", "Elastic offline 2"]
    with LLM(str(tiny_chat_checkpoint), tp=3, elastic=True, progress=False) as llm:
        before = [c.token_ids for c in llm.generate(prompts, max_new_tokens=8, ignore_eos=True)]
        for victim, tp in ((2, 2), (0, 1)):
            os.kill(llm.worker_pids[victim], signal.SIGKILL)
            time.sleep(0.3)
            assert [c.token_ids for c in llm.generate(prompts, max_new_tokens=8, ignore_eos=True)] == before
            assert llm.tp == tp and llm.rank_failures == 3 - tp
            assert f"rank {victim} of {tp + 1} failed: killed by signal SIGKILL; running again at tp={tp}" \
                in capfd.readouterr().err
