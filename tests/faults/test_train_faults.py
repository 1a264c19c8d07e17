"""Faults injected into ``tensorpar train`` while it saves a checkpoint every step: a rank killed
at tp=2 and tp=3. The run ends in one line naming the rank; every checkpoint left in the run
directory is complete (a save cut short never replaces the one before), and the run resumes from
the newest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import cli
from faultkit import error_line, finish, leftovers, nothing_left, ranks_of, start

from tensorpar.distributed.host import free_port

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


def _listens_on(proc: psutil.Process, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections())
    except psutil.Error:
        return False


@pytest.mark.timeout(240)
def test_a_node_killed_under_torchrun_elastic_resumes_at_the_smaller_size(tmp_path, record):
    """Two torchrun agents (``--nnodes 1:2``, one rank each, tp=2) train with ``--resume auto``,
    saving every step. SIGKILL of the agent that does not host the rendezvous, and of its rank:
    the other agent restarts its rank, which resumes from the newest complete checkpoint at tp=1;
    its losses equal those of a run started afresh at tp=1 from that checkpoint."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    run, out = tmp_path / "run", tmp_path / "out"
    port = free_port()
    train = ["-m", "tensorpar", "train", "--data", str(corpus), "--steps", "12", "--save", str(run), "--save-every", "1",
             "--resume", "auto", "--out", str(out), "--timeout", "20", *COMMON]
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1",
                                "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                "--rdzv-id", "elastic-test", "--rdzv-conf", "last_call_timeout=1", *train],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while len([p for p in run.glob("step-*") if (p / "metadata.json").is_file()]) < 3:
            assert time.monotonic() < deadline and all(a.poll() is None for a in agents), "no checkpoint was saved"
            time.sleep(0.05)
        host = next(a for a in agents if _listens_on(psutil.Process(a.pid), port))
        victim = next(a for a in agents if a is not host)
        node = psutil.Process(victim.pid)
        for p in node.children(recursive=True):
            p.kill()
        node.kill()
        t = time.monotonic()
        _, err = host.communicate(timeout=180)
        seconds = time.monotonic() - t
        assert host.returncode == 0, err[-3000:]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
            a.communicate()
    job = json.loads((out / "losses.json").read_text())
    resumed = Path(job["resumed_from"])
    assert job["tp"] == 1 and resumed.parent == run and job["steps"][-1] == 12
    step = int(resumed.name.split("-")[1])
    assert step >= 3 and job["first_step"] == step + 1
    fresh = cli("train", "--data", str(corpus), "--resume", str(resumed), "--steps", "12", "--tp", "1",
                "--out", str(tmp_path / "fresh"), "--json", "--quiet", *COMMON[:-1], timeout=150)
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(fresh.stdout)["losses"] == job["losses"]
    record(fault="SIGKILL of a node (its torchrun agent and rank) while training under torchrun --nnodes 1:2",
           command="train", layout="tp=2 -> 1",
           sees=f"the other agent restarts its rank, which resumes from step {step} at tp=1 and finishes; its losses "
                "equal a fresh tp=1 run from that checkpoint",
           seconds=round(seconds, 1), lost=f"the steps after the newest complete checkpoint (step {step}); redone at tp=1")
