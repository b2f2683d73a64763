"""Prometheus metrics of one server, in a registry of its own (two apps in one process,
as in tests, never collide).

vLLM's metric set under `tandem:` instead of `vllm:`: the same names, labels
(`model_name`, `engine`), bucket boundaries and meanings as vLLM v1's PrometheusStatLogger,
so a vLLM dashboard or alert works after `s/vllm:/tandem:/g`. The colon marks exactly
that set; tandem's own metrics, which vLLM has no counterpart for (per-client token
counters for VTC fairness, HTTP errors by status, whether the engine is alive), keep the
`tandem_` prefix.

Where the numbers come from:
- gauges and counters: the engine's `stats()` snapshot, read at scrape time (it crosses
  from the engine's process with every step);
- `iteration_tokens_total`: bucket counts the scheduler keeps, also in the snapshot;
- every other histogram: observed here as outputs arrive (`RequestTimer`). TTFT and e2e
  latency on the front end's clock, from the HTTP request's arrival; inter-token latency
  and the queue, prefill, decode and inference times from the engine's stamps on the
  outputs (`RequestMetrics`), each interval between two stamps of one clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from tandem.serve.scheduler import FINISH_REASONS, ITERATION_TOKENS_BUCKETS

PREFIX = "tandem:"
# vLLM's buckets: TTFT from 1 ms to 43 min; per-token latency from 10 ms to 80 s; request
# phases (e2e, queue, prefill, decode, inference) from 0.3 s to 2 h 8 min.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
N_BUCKETS = (1, 2, 5, 10, 20)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's build_1_2_5_buckets)."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return buckets
            buckets.append(m * scale)
        scale *= 10


class _EngineCollector:
    """Reads the engine snapshot on every scrape."""

    def __init__(self, stats: Callable[[], dict], is_alive: Callable[[], bool], labels: dict):
        self._stats = stats
        self._is_alive = is_alive
        self._names = list(labels)
        self._values = list(labels.values())

    def _family(self, cls, name: str, doc: str, value=None, labels=()):
        family = cls(PREFIX + name, doc, labels=self._names + list(labels))
        if value is not None:
            family.add_metric(self._values, value)
        return family

    def collect(self):
        stats = self._stats()
        gauges = (
            ("num_requests_running", "Number of requests in model execution batches.",
             "num_running"),
            ("num_requests_waiting", "Number of requests waiting to be processed.",
             "num_waiting"),
            ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_usage"),
        )  # fmt: skip
        for name, doc, key in gauges:
            yield self._family(GaugeMetricFamily, name, doc, float(stats.get(key, 0.0)))
        counters = (
            ("num_preemptions", "Cumulative number of preemption from the engine.",
             "num_preemptions"),
            ("prompt_tokens", "Number of prefill tokens processed.", "num_prompt_tokens"),
            ("generation_tokens", "Number of generation tokens processed.",
             "num_generation_tokens"),
            ("prefix_cache_queries",
             "Prefix cache queries, in terms of number of queried tokens.",
             "num_prefix_cache_queries"),
            ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             "num_prefix_cache_hits"),
        )  # fmt: skip
        for name, doc, key in counters:
            yield self._family(CounterMetricFamily, name, doc, stats.get(key, 0))
        success = self._family(
            CounterMetricFamily,
            "request_success",
            "Count of successfully processed requests.",
            labels=["finished_reason"],
        )
        finished = stats.get("num_finished", {})
        for reason in dict.fromkeys(FINISH_REASONS + tuple(finished)):
            success.add_metric(self._values + [reason], finished.get(reason, 0))
        yield success
        yield self._iteration_tokens(*stats.get("iteration_tokens", ([], 0)))
        yield from self._tandem_own(stats)

    def _iteration_tokens(self, counts: list[int], total: int) -> HistogramMetricFamily:
        """The scheduler's per-bucket counts, made cumulative as Prometheus wants them."""
        counts = counts or [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, ITERATION_TOKENS_BUCKETS), "+Inf"], counts):
            cumulative += count
            buckets.append((bound, cumulative))
        family = self._family(
            HistogramMetricFamily,
            "iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
        )
        family.add_metric(self._values, buckets, sum_value=total)
        return family

    def _tandem_own(self, stats: dict):
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
    def __init__(
        self,
        stats: Callable[[], dict],
        is_alive: Callable[[], bool],
        *,
        model_name: str = "tandem",
        max_model_len: int = 1 << 20,
    ):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "engine": "0"}
        self.registry.register(_EngineCollector(stats, is_alive, labels))
        token_buckets = buckets_1_2_5(max_model_len)

        def histogram(name: str, doc: str, buckets):
            family = Histogram(
                PREFIX + name, doc, list(labels), buckets=buckets, registry=self.registry
            )
            return family.labels(**labels)

        self.ttft = histogram(
            "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        # vLLM's name for the same observations before 0.11; older dashboards read it.
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Histogram of time per output token in seconds (as inter_token_latency_seconds).",
            ITL_BUCKETS,
        )
        self.request_tpot = histogram(
            "request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        )
        phases = {
            "e2e": ("e2e_request_latency_seconds", "e2e request latency"),
            "queue": ("request_queue_time_seconds", "time spent in WAITING phase for request"),
            "inference": (
                "request_inference_time_seconds",
                "time spent in RUNNING phase for request",
            ),
            "prefill": ("request_prefill_time_seconds", "time spent in PREFILL phase for request"),
            "decode": ("request_decode_time_seconds", "time spent in DECODE phase for request"),
        }
        self.phases = {
            key: histogram(name, f"Histogram of {doc} in seconds.", REQUEST_LATENCY_BUCKETS)
            for key, (name, doc) in phases.items()
        }
        self.prompt_tokens = histogram(
            "request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.generation_tokens = histogram(
            "request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.max_generation_tokens = histogram(
            "request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            token_buckets,
        )
        self.params_n = histogram(
            "request_params_n", "Histogram of the n request parameter.", N_BUCKETS
        )
        self.params_max_tokens = histogram(
            "request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            token_buckets,
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
    """Observes one engine request's histograms from its outputs."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self._metrics = metrics
        self.arrival = arrival
        self._has_first_token = False
        self._last_token_time: dict[int, float] = {}  # per completion index

    def on_output(self, out) -> None:
        now = time.perf_counter()
        m = self._metrics
        new = [o for o in out.outputs if o.new_token_ids]
        if new and not self._has_first_token:
            m.ttft.observe(now - self.arrival)
            self._has_first_token = True
        # The engine's time for these tokens (the fake engine stamps none: ours then).
        t = out.metrics.last_token_time if out.metrics is not None else now
        for o in new:
            # A completion's tokens of one output came in one step: the gap since its
            # last output is spread over them, one observation per token after its first.
            k = len(o.new_token_ids)
            last = self._last_token_time.get(o.index)
            gap = 0.0 if last is None else (t - last) / k
            for _ in range(k - 1 if last is None else k):
                m.itl.observe(gap)
                m.tpot.observe(gap)
            self._last_token_time[o.index] = t
        if out.finished:
            self._finished(out, now)

    def _finished(self, out, now: float) -> None:
        m = self._metrics
        m.phases["e2e"].observe(now - self.arrival)
        lengths = [len(o.token_ids) for o in out.outputs]
        m.prompt_tokens.observe(len(out.prompt_token_ids))
        m.generation_tokens.observe(sum(lengths))
        m.max_generation_tokens.observe(max(lengths, default=0))
        r = out.metrics
        if r is None:
            return
        m.params_n.observe(r.n)
        m.params_max_tokens.observe(r.max_tokens)
        if r.first_scheduled_time is not None:
            m.phases["queue"].observe(r.first_scheduled_time - r.arrival_time)
        if r.first_token_time is not None and r.first_scheduled_time is not None:
            decode = r.last_token_time - r.first_token_time
            m.phases["prefill"].observe(r.first_token_time - r.first_scheduled_time)
            m.phases["decode"].observe(decode)
            m.phases["inference"].observe(r.last_token_time - r.first_scheduled_time)
            # The first token is the prefill's; the longest completion spans the decode.
            num_decoded = max(lengths, default=0) - 1
            m.request_tpot.observe(decode / num_decoded if num_decoded > 0 else 0.0)
