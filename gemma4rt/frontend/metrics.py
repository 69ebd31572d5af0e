"""Prometheus metrics with SGLang's names (served only with --enable-metrics)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for app.py)

_LAT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0, 160.0)
_ITL = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1,
        0.2, 0.4, 0.8, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        lab = ["model_name"]
        self.model_name = model_name
        self._running = Gauge("sglang:num_running_reqs", "Running requests", lab, registry=r)
        self._queued = Gauge("sglang:num_queue_reqs", "Waiting requests", lab, registry=r)
        self._usage = Gauge("sglang:token_usage", "Fraction of KV pages in use", lab + ["pool"], registry=r)
        self._hit = Gauge("sglang:cache_hit_rate", "Prefix cache hit rate (tokens)", lab, registry=r)
        self._preempt = Gauge("sglang:num_preemptions", "Preemptions so far", lab, registry=r)
        self._prompt = Counter("sglang:prompt_tokens", "Prompt tokens", lab, registry=r)
        self._gen = Counter("sglang:generation_tokens", "Generated tokens", lab, registry=r)
        self._reqs = Counter("sglang:num_requests", "Finished requests by finish reason",
                             lab + ["finish_reason"], registry=r)
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "TTFT", lab, buckets=_LAT,
                              registry=r).labels(model_name)
        self.itl = Histogram("sglang:inter_token_latency_seconds", "ITL", lab, buckets=_ITL,
                             registry=r).labels(model_name)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds", "E2E latency", lab, buckets=_LAT,
                             registry=r).labels(model_name)

    def on_stats(self, s) -> None:
        n = self.model_name
        self._running.labels(n).set(s.num_running)
        self._queued.labels(n).set(s.num_waiting)
        for pool, u in s.pool_usage.items():
            self._usage.labels(n, pool).set(u)
        if s.prefix_query_tokens:
            self._hit.labels(n).set(s.prefix_hit_tokens / s.prefix_query_tokens)
        self._preempt.labels(n).set(s.num_preemptions)

    def on_finish(self, reason: str, prompt_tokens: int = 0, gen_tokens: int = 0, e2e=None) -> None:
        n = self.model_name
        self._reqs.labels(n, reason).inc()
        if prompt_tokens:
            self._prompt.labels(n).inc(prompt_tokens)
        if gen_tokens:
            self._gen.labels(n).inc(gen_tokens)
        if e2e is not None:
            self.e2e.observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
