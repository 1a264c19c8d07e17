"""Prometheus metrics of one server: request counts, token counts, latencies, engine gauges.

Each app has its own registry (so several apps in one process, as in tests, do not collide).
The engine gauges are read from ``engine.stats()`` when scraped, never cached.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = CONTENT_TYPE_LATEST
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0, 160.0)


class _EngineCollector:
    """Gauges from ``engine.stats()`` at scrape time, one series per replica (label ``replica``;
    a server of one replica has replica "0")."""

    GAUGES = (
        ("tensorpar_num_requests_running", "Sequences the engine is generating now.", "running"),
        ("tensorpar_num_requests_waiting", "Sequences queued for a free slot.", "waiting"),
        ("tensorpar_kv_cache_usage_ratio", "Fraction of the KV cache in use (0 to 1).", "kv_cache_usage"),
        ("tensorpar_kv_cache_free_slots", "KV-cache slots free for new sequences.", "free_slots"),
        ("tensorpar_replica_outstanding_requests", "Requests sent to the replica and not yet finished.",
         "outstanding"),
        ("tensorpar_replica_healthy", "1 while every rank of the replica is alive, else 0.", "healthy"),
    )

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        try:
            s = self.engine.stats()
        except Exception:  # a broken engine must not break the scrape
            s = {"healthy": False}
        replicas = s.get("replicas") or [{**s, "outstanding": s.get("running", 0) + s.get("waiting", 0)}]
        for name, doc, key in self.GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["replica"])
            for i, r in enumerate(replicas):
                family.add_metric([str(i)], float(r.get(key) or 0))
            yield family
        requests = CounterMetricFamily("tensorpar_replica_requests", "Requests sent to the replica.", labels=["replica"])
        for i, r in enumerate(replicas):
            requests.add_metric([str(i)], float(r.get("requests") or 0))
        yield requests
        tokens = CounterMetricFamily("tensorpar_expert_tokens", "Tokens routed to each expert of each MoE layer "
                                     "(the leader's pipeline stage).", labels=["replica", "layer", "expert"])
        imbalance = GaugeMetricFamily("tensorpar_expert_load_imbalance", "Per MoE layer: the busiest expert set's "
                                      "tokens over the mean (1 is even).", labels=["replica", "layer"])
        for i, r in enumerate(replicas):
            experts = r.get("experts") or {}
            for layer, counts in (experts.get("tokens") or {}).items():
                for e, n in enumerate(counts):
                    tokens.add_metric([str(i), str(layer), str(e)], float(n))
                imbalance.add_metric([str(i), str(layer)], float(experts["imbalance"][layer]))
        yield tokens
        yield imbalance
        yield GaugeMetricFamily("tensorpar_engine_healthy", "1 while the server can serve (any replica is healthy), "
                                "else 0.", value=1.0 if s.get("healthy") else 0.0)


class Metrics:
    def __init__(self, engine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tensorpar_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("tensorpar_prompt_tokens", "Prompt tokens submitted.", registry=r)
        self.generation_tokens = Counter("tensorpar_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("tensorpar_time_to_first_token_seconds",
                              "From the request's arrival to its first token.", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tensorpar_inter_token_latency_seconds",
                             "Between consecutive tokens of one sequence.", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tensorpar_e2e_request_latency_seconds",
                             "From the request's arrival to a sequence's end.", buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware: counts every HTTP request by endpoint and the status it was answered with
    (unknown paths count as endpoint "other")."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
