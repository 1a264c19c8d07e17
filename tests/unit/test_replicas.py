"""``ReplicaSet``: least-outstanding balancing over data-parallel replicas, summed stats, and
serving on when a replica is down (with stand-in replicas; the real ones are in the e2e tests)."""

from __future__ import annotations

from types import SimpleNamespace

from tensorpar.runtime.replicas import ReplicaSet
from tensorpar.runtime.request import Request, TokenEvent
from tensorpar.runtime.sampling import SamplingParams
from tensorpar.runtime.sequence import final_event


class FakeReplica:
    model_name, tokenizer, inputs, max_model_len, tp = "m", None, None, 64, 1

    def __init__(self):
        self.healthy, self.error = True, None
        self.sinks, self.aborted = {}, []

    def submit(self, request, sink):
        self.sinks[request.request_id] = sink

    def abort(self, request_id):
        self.aborted.append(request_id)

    def stats(self):
        return {"running": len(self.sinks), "waiting": 0, "kv_cache_usage": 0.5, "healthy": self.healthy,
                "error": self.error, "requests": len(self.sinks)}

    def finish(self, request_id):
        self.sinks.pop(request_id)(final_event(request_id, "stop"))


def request(i: int) -> Request:
    return Request(f"r{i}", [1, 2], SamplingParams(max_new_tokens=2))


def test_each_request_goes_to_the_replica_with_fewest_outstanding():
    a, b, c = FakeReplica(), FakeReplica(), FakeReplica()
    rs = ReplicaSet([a, b, c], "tp=1 dp=3")
    events = []
    for i in range(4):
        rs.submit(request(i), events.append)
    assert (sorted(a.sinks), sorted(b.sinks), sorted(c.sinks)) == (["r0", "r3"], ["r1"], ["r2"])
    b.finish("r1")
    c.finish("r2")
    assert [e.request_id for e in events] == ["r1", "r2"]
    rs.submit(request(4), events.append)  # b and c now have none outstanding: the lowest index wins
    assert "r4" in b.sinks
    rs.abort("r3")
    assert a.aborted == ["r3"] and b.aborted == c.aborted == []
    stats = rs.stats()
    assert stats["running"] == 3 and stats["healthy"] and stats["error"] is None
    assert [r["outstanding"] for r in stats["replicas"]] == [2, 1, 0]


def test_a_replica_that_is_down_gets_no_requests_and_is_named():
    a, b = FakeReplica(), FakeReplica()
    rs = ReplicaSet([a, b], "tp=1 dp=2")
    a.healthy, a.error = False, "rank 1 of 2 failed: killed by signal SIGKILL"
    events: list[TokenEvent] = []
    for i in range(3):
        rs.submit(request(i), events.append)
    assert not a.sinks and sorted(b.sinks) == ["r0", "r1", "r2"]
    stats = rs.stats()
    assert stats["healthy"] and stats["kv_cache_usage"] == 0.5 and stats["running"] == 3
    assert stats["error"] == "replica 0 of 2 is down: rank 1 of 2 failed: killed by signal SIGKILL"
    b.healthy, b.error = False, "its leader process (pid 7) killed by signal SIGKILL"
    rs.submit(request(9), events.append)
    (last,) = events
    assert last.finished and last.finish_reason == "error" and "replica 1 of 2 is down" in last.error
    assert not rs.healthy and not rs.stats()["healthy"]


def test_metrics_label_each_replica():
    from tensorpar.serve.metrics import Metrics

    a, b = FakeReplica(), FakeReplica()
    rs = ReplicaSet([a, b], "tp=1 dp=2")
    rs.submit(request(0), lambda e: None)
    b.healthy = False
    text = Metrics(SimpleNamespace(stats=rs.stats)).render().decode()
    for line in ('tensorpar_replica_healthy{replica="0"} 1.0', 'tensorpar_replica_healthy{replica="1"} 0.0',
                 'tensorpar_replica_outstanding_requests{replica="0"} 1.0', 'tensorpar_replica_requests_total{replica="0"} 1.0',
                 'tensorpar_num_requests_running{replica="0"} 1.0', "tensorpar_engine_healthy 1.0"):
        assert line in text, line
