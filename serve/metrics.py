"""Prometheus metrics of one server, in a registry of its own (two apps in one process,
as in tests, never collide).

Engine gauges and the per-client token counters are read from the engine's `stats()`
snapshot at scrape time; latencies are observed by the HTTP layer as outputs arrive.
Names follow vLLM's (`num_requests_running`, `time_to_first_token_seconds`, ...) under
a `tandem_` prefix.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's buckets: TTFT from 1 ms to 2.5 min, inter-token latency from 10 ms to 80 s.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0)  # fmt: skip

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineCollector:
    """Reads the engine snapshot on every scrape."""

    def __init__(self, stats: Callable[[], dict], is_alive: Callable[[], bool]):
        self._stats = stats
        self._is_alive = is_alive

    def collect(self):
        stats = self._stats()
        gauges = (
            ("num_requests_running", "Requests running in the engine.", "num_running"),
            ("num_requests_waiting", "Requests waiting for the engine.", "num_waiting"),
            ("kv_cache_usage_perc", "Fraction of KV pages held by requests (0..1).", "kv_usage"),
            ("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache.",
             "prefix_hit_rate"),
        )  # fmt: skip
        for name, doc, key in gauges:
            yield GaugeMetricFamily(f"tandem_{name}", doc, value=float(stats.get(key, 0.0)))
        yield GaugeMetricFamily(
            "tandem_engine_alive", "1 while the engine thread runs.", value=float(self._is_alive())
        )
        prompt = CounterMetricFamily(
            "tandem_prompt_tokens", "Prompt tokens admitted, per client.", labels=["client"]
        )
        generated = CounterMetricFamily(
            "tandem_generation_tokens", "Tokens generated, per client.", labels=["client"]
        )
        for client, counts in sorted(stats.get("clients", {}).items()):
            prompt.add_metric([client], counts.get("prompt_tokens", 0))
            generated.add_metric([client], counts.get("generated_tokens", 0))
        yield prompt
        yield generated


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict], is_alive: Callable[[], bool]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, is_alive))
        self.ttft = Histogram(
            "tandem_time_to_first_token_seconds",
            "From the request's arrival to its first token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "tandem_inter_token_latency_seconds",
            "Between consecutive outputs of a request that carry new tokens.",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "tandem_e2e_request_latency_seconds",
            "From the request's arrival to its last token.",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "tandem_request_success",
            "Completions finished, by finish_reason.",
            ["finish_reason"],
            registry=self.registry,
        )
        self.errors = Counter(
            "tandem_request_errors",
            "Requests answered with an error, by HTTP status.",
            ["status"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return _generate_latest(self.registry)

    def timer(self, arrival: float) -> RequestTimer:
        """Times a request that arrived at `arrival` (time.perf_counter())."""
        return RequestTimer(self, arrival)


class RequestTimer:
    """Observes one request's latencies from its outputs."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self._metrics = metrics
        self.arrival = arrival
        self._last: float | None = None

    def on_output(self, out) -> None:
        now = time.perf_counter()
        if any(o.new_token_ids for o in out.outputs):
            if self._last is None:
                self._metrics.ttft.observe(now - self.arrival)
            else:
                self._metrics.itl.observe(now - self._last)
            self._last = now
        if out.finished:
            self._metrics.e2e.observe(now - self.arrival)
            for o in out.outputs:
                self._metrics.finished.labels(o.finish_reason or "abort").inc()
