"""Beyond one machine: two ``torchrun`` launchers with ``--nnodes 2`` on 127.0.0.1 form one
group spanning both "nodes" and produce the tokens of TP=1: one rank each as a TP=2 group, and
two ranks each as tp=2 x pp=2 (a stage's TP group inside each node, the stages across them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import cli

from tensorpar.distributed.host import free_port


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


@pytest.mark.timeout(180)
def test_two_node_torchrun_serves_two_replicas(tiny_chat_checkpoint, tmp_path):
    """``serve --dp 2`` over two torchrun "nodes": each replica is a process group of its own (on
    torchrun's store), replica 1's leader connects back to the server on rank 0, both answer as
    TP=1 does, and the server's SIGTERM ends both launchers cleanly."""
    import time

    import httpx
    import psutil

    model = str(tiny_chat_checkpoint)
    port, http_port = str(free_port()), free_port()
    logs = [(tmp_path / f"node{n}.out", tmp_path / f"node{n}.err") for n in (0, 1)]
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port,
             "-m", "tensorpar", "serve", "--model", model, "--tp", "1", "--dp", "2", "--port", str(http_port)],
            stdout=open(logs[node][0], "w"), stderr=open(logs[node][1], "w"), text=True,
        )
        for node in (0, 1)
    ]
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail("no server:\n" + "\n".join(e.read_text()[-3000:] for _, e in logs))
        body = {"prompt": "Tensor parallelism splits", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        with httpx.Client(base_url=base, timeout=60) as http:
            import concurrent.futures as cf

            with cf.ThreadPoolExecutor(5) as pool:
                busy = pool.submit(http.post, "/v1/completions", json={**body, "max_tokens": 400})
                time.sleep(0.5)  # replica 0 has one outstanding: the next goes to replica 1
                texts = list(pool.map(lambda _: http.post("/v1/completions", json=body).json()["choices"][0]["text"],
                                      range(4)))
                busy.result()
            health = http.get("/health").json()
            metrics = http.get("/metrics").text
        assert [r["outstanding_requests"] for r in health["replicas"]] == [0, 0] and health["status"] == "ok"
        assert 'tensorpar_replica_requests_total{replica="1"} 0.0' not in metrics, metrics
        (server,) = psutil.Process(launchers[0].pid).children()
        server.send_signal(15)
        for p in launchers:
            p.wait(timeout=60)
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
    errs = [e.read_text() for _, e in logs]
    assert [p.returncode for p in launchers] == [0, 0], errs
    single = cli("generate", "--model", model, "--json", "--ignore-eos", "--max-new-tokens", "12",
                 "--prompt", "Tensor parallelism splits", "--tp", "1")
    assert texts == [json.loads(single.stdout)["text"]] * 4
    assert "(tp=1 within each node, dp=2 across 2 nodes)" in errs[0]
