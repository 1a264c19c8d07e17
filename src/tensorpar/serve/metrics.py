"""Prometheus metrics of one server: request counts, token counts, latencies, engine gauges.

Each app has its own registry (so several apps in one process, as in tests, do not collide).
The engine gauges are read from ``engine.stats()`` when scraped, never cached.

Beside tensorpar's own series, the ones gateways and autoscalers already scrape from vLLM are
exported under vLLM's names and label (``model_name``): ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (and its older name
``vllm:gpu_cache_usage_perc``; a ratio from 0 to 1, as vLLM's), ``vllm:prefix_cache_queries`` /
``vllm:prefix_cache_hits`` (prompt tokens), ``vllm:num_preemptions``, speculative decoding's
``vllm:spec_decode_num_drafts`` / ``_num_draft_tokens`` / ``_num_accepted_tokens`` /
``_num_accepted_tokens_per_pos`` (label ``position``), ``vllm:prompt_tokens``,
``vllm:generation_tokens``, ``vllm:request_success`` (by ``finished_reason``) and the
``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds`` (also as
``vllm:time_per_output_token_seconds``) and ``vllm:e2e_request_latency_seconds`` histograms, and
per finished sequence with vLLM's buckets ``vllm:request_prompt_tokens``,
``vllm:request_generation_tokens``, ``vllm:request_params_max_tokens``, ``vllm:request_params_n``
(per prompt) and the times of its phases, ``vllm:request_queue_time_seconds`` (arrival to
running), ``_prefill_time_seconds`` (to the first token), ``_decode_time_seconds`` (to the end)
and ``_inference_time_seconds`` (running to the end); ``vllm:iteration_tokens_total`` (new tokens per
model step, from the schedulers) and ``vllm:cache_config_info``.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from tensorpar.runtime.speculative import speculation_summary

CONTENT_TYPE = CONTENT_TYPE_LATEST
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0, 160.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)  # vLLM's, for the phases of a request
N_BUCKETS = (1, 2, 5, 10, 20)


def one_two_five(limit: int) -> list[int]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to ``limit``."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(m * scale)
        scale *= 10


class _EngineCollector:
    """Gauges from ``engine.stats()`` at scrape time, one series per replica (label ``replica``;
    a server of one replica has replica "0")."""

    GAUGES = (
        ("tensorpar_num_requests_running", "Sequences the engine is generating now.", "running"),
        ("tensorpar_num_requests_waiting", "Sequences queued for a free slot.", "waiting"),
        ("tensorpar_kv_cache_usage_ratio", "Fraction of the KV cache's blocks owned by sequences (0 to 1).",
         "kv_cache_usage"),
        ("tensorpar_kv_cache_free_blocks", "KV-cache blocks free for sequences (cached prefixes included).",
         "free_blocks"),
        ("tensorpar_kv_cache_blocks", "KV-cache blocks in all.", "kv_blocks"),
        ("tensorpar_replica_outstanding_requests", "Requests sent to the replica and not yet finished.",
         "outstanding"),
        ("tensorpar_replica_healthy", "1 while every rank of the replica is alive, else 0.", "healthy"),
        ("tensorpar_replica_tensor_parallel_size", "The replica's tensor-parallel degree now (smaller after an elastic "
         "restart).", "tp"),
    )

    COUNTERS = (
        ("tensorpar_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
        ("tensorpar_prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
        ("tensorpar_preemptions", "Sequences preempted for want of KV-cache blocks.", "preemptions"),
        ("tensorpar_spec_decode_num_drafts", "Speculative decoding: sequences' verifications of drafts.", "spec_drafts"),
        ("tensorpar_spec_decode_num_draft_tokens", "Speculative decoding: draft tokens proposed and verified.",
         "spec_draft_tokens"),
        ("tensorpar_spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens the target accepted.",
         "spec_accepted_tokens"),
        ("tensorpar_rank_failures", "Times a rank of the replica died or stopped answering and the replica was "
         "restarted (serve --elastic, --dp).", "rank_failures"),
    )
    VLLM = (  # (vLLM's name, gauge or counter, key): the sums over replicas (a ratio: their mean)
        ("vllm:num_requests_running", GaugeMetricFamily, "running"),
        ("vllm:num_requests_waiting", GaugeMetricFamily, "waiting"),
        ("vllm:kv_cache_usage_perc", GaugeMetricFamily, "kv_cache_usage"),
        ("vllm:gpu_cache_usage_perc", GaugeMetricFamily, "kv_cache_usage"),
        ("vllm:prefix_cache_queries", CounterMetricFamily, "prefix_cache_queries"),
        ("vllm:prefix_cache_hits", CounterMetricFamily, "prefix_cache_hits"),
        ("vllm:num_preemptions", CounterMetricFamily, "preemptions"),
        ("vllm:spec_decode_num_drafts", CounterMetricFamily, "spec_drafts"),
        ("vllm:spec_decode_num_draft_tokens", CounterMetricFamily, "spec_draft_tokens"),
        ("vllm:spec_decode_num_accepted_tokens", CounterMetricFamily, "spec_accepted_tokens"),
    )

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

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
        for name, doc, key in self.COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["replica"])
            for i, r in enumerate(replicas):
                family.add_metric([str(i)], float(r.get(key) or 0))
            yield family
        for name, kind, key in self.VLLM:
            total = sum(float(r.get(key) or 0) for r in replicas)
            family = kind(name, f"vLLM's name for tensorpar's {key}.", labels=["model_name"])
            family.add_metric([self.model_name], total / len(replicas) if key == "kv_cache_usage" else total)
            yield family
        first = replicas[0]
        steps = [r["step_tokens"] for r in replicas if r.get("step_tokens")]
        if steps:  # vLLM's tokens per engine step, over the replicas
            from tensorpar.runtime.scheduler import STEP_TOKEN_BUCKETS

            counts = [sum(c) for c in zip(*(h["counts"] for h in steps))]
            cumulative = [sum(counts[: i + 1]) for i in range(len(counts))]
            hist = HistogramMetricFamily("vllm:iteration_tokens_total", "New tokens per model step.",
                                         labels=["model_name"])
            hist.add_metric([self.model_name], [(str(float(le)), c) for le, c in zip(STEP_TOKEN_BUCKETS, cumulative)]
                            + [("+Inf", cumulative[-1])], sum(h["sum"] for h in steps))
            yield hist
        if "block_size" in first:  # vLLM's cache configuration, as labels of a constant 1
            info = GaugeMetricFamily("vllm:cache_config_info", "The KV cache's configuration (labels).",
                                     labels=["model_name", "block_size", "enable_prefix_caching", "num_gpu_blocks"])
            info.add_metric([self.model_name, str(first["block_size"]), str(bool(first.get("prefix_caching"))),
                             str(int(first.get("kv_blocks") or 0))], 1.0)
            yield info
        rate = GaugeMetricFamily("tensorpar_spec_decode_acceptance_rate", "Speculative decoding: draft tokens "
                                 "accepted over those proposed, since start.", labels=["replica"])
        length = GaugeMetricFamily("tensorpar_spec_decode_mean_acceptance_length", "Speculative decoding: tokens a "
                                   "verifying step yields per sequence (accepted drafts + 1), since start.",
                                   labels=["replica"])
        for i, r in enumerate(replicas):
            summary = speculation_summary(r)
            rate.add_metric([str(i)], summary["acceptance_rate"])
            length.add_metric([str(i)], summary["mean_acceptance_length"])
        yield rate
        yield length
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos", "Speculative decoding: how "
                                      "often the draft at each position of a step was accepted.",
                                      labels=["model_name", "position"])
        totals: dict[int, float] = {}
        for r in replicas:
            for j, n in enumerate(r.get("spec_accepted_per_pos") or []):
                totals[j] = totals.get(j, 0.0) + n
        for j, n in sorted(totals.items()):
            per_pos.add_metric([self.model_name, str(j)], n)
        yield per_pos
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


class _Series:
    """One measure under several names: each ``inc`` / ``observe`` goes to all of them."""

    def __init__(self, *metrics):
        self.metrics = metrics

    def inc(self, amount: float = 1) -> None:
        for m in self.metrics:
            m.inc(amount)

    def observe(self, value: float) -> None:
        for m in self.metrics:
            m.observe(value)


class Metrics:
    def __init__(self, engine, model_name: str = ""):
        r = self.registry = CollectorRegistry()
        model = [model_name]

        def both(kind, name: str, doc: str, vllm: list[str], **kw):
            ours = kind(f"tensorpar_{name}", doc, registry=r, **kw)
            return _Series(ours, *(kind(f"vllm:{v}", doc, ["model_name"], registry=r, **kw).labels(*model)
                                   for v in vllm))

        self.requests = Counter("tensorpar_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = both(Counter, "prompt_tokens", "Prompt tokens submitted.", ["prompt_tokens"])
        self.generation_tokens = both(Counter, "generation_tokens", "Tokens generated.", ["generation_tokens"])
        self.ttft = both(Histogram, "time_to_first_token_seconds", "From the request's arrival to its first token.",
                         ["time_to_first_token_seconds"], buckets=LATENCY_BUCKETS)
        self.itl = both(Histogram, "inter_token_latency_seconds", "Between consecutive tokens of one sequence.",
                        ["inter_token_latency_seconds", "time_per_output_token_seconds"], buckets=LATENCY_BUCKETS)
        self.e2e = both(Histogram, "e2e_request_latency_seconds", "From the request's arrival to a sequence's end.",
                        ["e2e_request_latency_seconds"], buckets=LATENCY_BUCKETS)
        self._success = Counter("vllm:request_success", "Sequences finished, by reason.", ["model_name", "finished_reason"],
                                registry=r)

        def vllm(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"vllm:{name}", doc, ["model_name"], registry=r, buckets=buckets).labels(*model)

        tokens = one_two_five(int(getattr(engine, "max_model_len", 0) or 1 << 20))
        self.request_prompt_tokens = vllm("request_prompt_tokens", "Prompt tokens of each finished sequence.", tokens)
        self.request_generation_tokens = vllm("request_generation_tokens", "Tokens each finished sequence generated.",
                                              tokens)
        self.request_max_tokens = vllm("request_params_max_tokens", "max_tokens of each finished sequence.", tokens)
        self.request_n = vllm("request_params_n", "Choices asked for per prompt.", N_BUCKETS)
        self.queue_time = vllm("request_queue_time_seconds", "From arrival until the sequence started running.",
                               REQUEST_BUCKETS)
        self.prefill_time = vllm("request_prefill_time_seconds", "From starting to run until the first token.",
                                 REQUEST_BUCKETS)
        self.decode_time = vllm("request_decode_time_seconds", "From the first token to the end.", REQUEST_BUCKETS)
        self.inference_time = vllm("request_inference_time_seconds", "From starting to run to the end.",
                                   REQUEST_BUCKETS)
        self.model_name = model_name
        r.register(_EngineCollector(engine, model_name))

    def finished(self, reason: str) -> None:
        """A sequence ended for ``reason`` (``stop``, ``length``, ``abort``, ...)."""
        self._success.labels(self.model_name, reason).inc()

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
