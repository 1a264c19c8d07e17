"""Faults injected into ``tensorpar train`` while it saves a checkpoint every step: a rank killed
at tp=2 and tp=3. The run ends in one line naming the rank; every checkpoint left in the run
directory is complete (a save cut short never replaces the one before), and the run resumes from
the newest."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from helpers import cli
from faultkit import error_line, finish, leftovers, nothing_left, ranks_of, start

TEXT = "Tensor parallelism splits each weight matrix across devices. The quick brown fox. " * 200
COMMON = ["--model", "random-llama-tiny", "--seq-len", "32", "--batch", "4", "--seed", "7", "--quiet"]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("tp, victim", [(2, 1), (3, 0)])
def test_sigkill_of_a_rank_while_saving_every_step(tp, victim, tmp_path, record):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    run = tmp_path / "run"
    before = leftovers()
    proc, _ = start("train", "--data", str(corpus), "--tp", str(tp), "--steps", "100000", "--save", str(run),
                    "--save-every", "1", "--out", str(tmp_path / "out"), *COMMON, until=None)
    try:
        deadline = time.monotonic() + 120
        while len(list(run.glob("step-*"))) < 3:
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint was saved"
            time.sleep(0.05)
        ranks = ranks_of(proc)
        t = time.monotonic()
        os.kill(ranks[f"tensorpar-r{victim}"].pid, signal.SIGKILL)
        err = finish(proc)
        seconds = time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
    line = error_line(err)
    assert f"rank {victim} of {tp} failed: killed by signal SIGKILL" in line and seconds < 30
    nothing_left(ranks, before)
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("step-*"))
    for step in steps:  # every visible checkpoint is whole
        meta = json.loads((run / f"step-{step:08d}" / "metadata.json").read_text())
        assert meta["step"] == step
    if tp == 2:  # and the run goes on from the newest
        r = cli("train", "--data", str(corpus), "--resume", str(run), "--steps", str(steps[-1] + 1), "--tp", "2",
                "--out", str(tmp_path / "out2"), "--json", "--quiet", timeout=150)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["steps"] == [steps[-1] + 1]
    record(fault=f"SIGKILL of rank {victim} while training and saving every step", command="train",
           layout=f"tp={tp}", sees=line, seconds=round(seconds, 1),
           lost=f"the steps after the newest complete checkpoint (step {steps[-1]}); it resumes from there")
