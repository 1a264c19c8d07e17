"""Beyond one machine: two ``torchrun`` launchers with ``--nnodes 2`` on 127.0.0.1 form one
group spanning both "nodes" and produce the tokens of TP=1: one rank each as a TP=2 group, and
two ranks each as tp=2 x pp=2 (a stage's TP group inside each node, the stages across them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import cli

from tensorpar.distributed.launch import free_port


@pytest.mark.timeout(180)
@pytest.mark.parametrize("comm,backend,per_node,layout", [("gloo", "gloo", 1, ["--tp", "2"]),
                                                          ("auto", "shm+gloo", 1, ["--tp", "2"]),
                                                          ("gloo", "gloo", 2, ["--tp", "2", "--pp", "2"])])
def test_two_node_torchrun_matches_tp1(comm, backend, per_node, layout, tiny_chat_checkpoint, tmp_path):
    """``--comm gloo`` takes the path two real machines take; with ``auto`` the two "nodes" are
    found to share this host and switch to shared memory."""
    common = ["generate", "--model", str(tiny_chat_checkpoint), "--json", "--ignore-eos",
              "--max-new-tokens", "12", "--prompt", "Tensor parallelism splits", "--comm", comm]
    args = [*common, *layout]
    port = str(free_port())
    logs = [(tmp_path / f"node{n}.out", tmp_path / f"node{n}.err") for n in (0, 1)]
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(per_node),
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port,
             "-m", "tensorpar", *args],
            stdout=open(logs[node][0], "w"), stderr=open(logs[node][1], "w"), text=True,
        )
        for node in (0, 1)
    ]
    try:
        for p in launchers:
            p.wait(timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun launchers hung:\n" + "\n".join(e.read_text()[-3000:] for _, e in logs))
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
    outs = [(o.read_text(), e.read_text()) for o, e in logs]
    for p, (_, err) in zip(launchers, outs):
        assert p.returncode == 0, err
    assert outs[1][0].strip() == ""  # only rank 0 prints
    two_nodes = json.loads(outs[0][0])
    single = cli(*common, "--tp", "1")
    assert single.returncode == 0, single.stderr
    one = json.loads(single.stdout)
    assert two_nodes["tp"] == 2 and two_nodes["pp"] == len(layout) // 2 and two_nodes["backend"] == backend
    assert two_nodes["token_ids"] == one["token_ids"]
    assert len(two_nodes["peak_rss_mb"]) == 2 * per_node
    shown = "tp=2 within each node, pp=2 across 2 nodes" if per_node == 2 else "tp=2 across 2 nodes"
    assert f"at {shown} (" in outs[0][1]
