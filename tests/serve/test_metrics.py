"""The vLLM-named metrics (`tandem:`) hold the right values, not just the right names.

A known workload goes through the real HTTP server over the real engine (the tiny random
model, byte tokenizer; greedy with `ignore_eos`, so lengths are exact) and /metrics is read
before and after it: counters and histogram counts must move by what the workload implies.
The engine is small on purpose (4 slots, 12 pages of 16 tokens) so that a heavier workload
preempts and queues. The scheduler's own counters are checked by hand on plain Python.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from flax import nnx
from prometheus_client.parser import text_string_to_metric_families
from test_openai_server import running, wait_idle

from tandem.model import ModelConfig, Transformer
from tandem.model.tokenizer import byte_tokenizer
from tandem.paged_cache import BlockManager
from tandem.serve.async_engine import AsyncEngine
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.metrics import TTFT_BUCKETS, buckets_1_2_5
from tandem.serve.openai_server import build_app
from tandem.serve.sampling_params import SamplingParams
from tandem.serve.scheduler import Scheduler, SchedulerConfig
from tandem.serve.sequence import Sequence

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana" / "tandem.json"
MODEL = "tiny"
PAGE_SIZE = 16
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})
LABELS = {"model_name": MODEL, "engine": "0"}


@pytest.fixture(scope="module")
def raw_engine():
    cfg = ModelConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    config = EngineConfig(
        page_size=PAGE_SIZE, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
        num_pages=12,
    )  # fmt: skip
    return Engine(model, byte_tokenizer(), config, model_name=MODEL)


@pytest.fixture(scope="module")
def engine(raw_engine):
    async_engine = AsyncEngine(raw_engine)
    yield async_engine
    async_engine.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    with running(build_app(engine)) as base:
        yield base


def encode(text: str) -> list[int]:
    return byte_tokenizer().encode(text)


def scrape(url: str) -> dict[tuple, float]:
    """Every sample of /metrics: (name, labels other than model_name/engine) -> value."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            labels = dict(s.labels)
            if s.name.startswith("tandem:"):
                assert {k: labels.pop(k) for k in LABELS} == LABELS, s
            samples[(s.name, tuple(sorted(labels.items())))] = s.value
    return samples


class Delta:
    """How much each sample moved between two scrapes."""

    def __init__(self, before: dict, after: dict):
        self.before, self.after = before, after

    def __call__(self, name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return self.after[key] - self.before.get(key, 0.0)


def test_counters_and_histograms_match_a_known_workload(url, engine):
    before = scrape(url)
    plain = [f"metrics plain prompt {i}" for i in range(3)]
    streamed = [f"metrics streamed prompt number {i}" for i in range(2)]
    num_prompt, num_generated = 0, 0
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        for prompt in plain:
            r = client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=5, user="metered", **GREEDY
            )
            num_prompt += r.usage.prompt_tokens
            num_generated += r.usage.completion_tokens
        for prompt in streamed:
            chunks = list(
                client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=6, stream=True, user="metered",
                    stream_options={"include_usage": True}, **GREEDY,
                )
            )  # fmt: skip
            num_prompt += chunks[-1].usage.prompt_tokens
            num_generated += chunks[-1].usage.completion_tokens
    assert num_prompt == sum(len(encode(p)) for p in plain + streamed)
    assert num_generated == 3 * 5 + 2 * 6
    wait_idle(engine)
    d = Delta(before, scrape(url))

    num_requests = 5
    assert d("tandem:prompt_tokens_total") == num_prompt
    assert d("tandem:generation_tokens_total") == num_generated
    assert d("tandem:request_success_total", finished_reason="length") == num_requests
    for reason in ("stop", "abort", "error"):
        assert d("tandem:request_success_total", finished_reason=reason) == 0
    assert d("tandem_prompt_tokens_total", client="metered") == num_prompt  # VTC's, kept
    assert d("tandem_generation_tokens_total", client="metered") == num_generated
    # One observation per request in every per-request histogram.
    for name in (
        "time_to_first_token_seconds", "e2e_request_latency_seconds",
        "request_queue_time_seconds", "request_prefill_time_seconds",
        "request_decode_time_seconds", "request_inference_time_seconds",
        "request_time_per_output_token_seconds", "request_prompt_tokens",
        "request_generation_tokens", "request_max_num_generation_tokens",
        "request_params_n", "request_params_max_tokens",
    ):  # fmt: skip
        assert d(f"tandem:{name}_count") == num_requests, name
    assert d("tandem:request_prompt_tokens_sum") == num_prompt
    assert d("tandem:request_generation_tokens_sum") == num_generated
    assert d("tandem:request_params_max_tokens_sum") == num_generated  # ran to max_tokens
    assert d("tandem:request_params_n_sum") == num_requests
    # Every token after a completion's first is one inter-token observation (the server
    # streams from the engine whether or not the client streams).
    assert d("tandem:inter_token_latency_seconds_count") == num_generated - num_requests
    assert d("tandem:time_per_output_token_seconds_count") == num_generated - num_requests
    # The phases nest: inference = prefill + decode (engine stamps); e2e, on the front
    # end's clock, spans the engine's part and the first token's wait.
    inference = d("tandem:request_inference_time_seconds_sum")
    assert inference == pytest.approx(
        d("tandem:request_prefill_time_seconds_sum") + d("tandem:request_decode_time_seconds_sum")
    )
    e2e = d("tandem:e2e_request_latency_seconds_sum")
    assert e2e >= inference > 0 and e2e >= d("tandem:time_to_first_token_seconds_sum") > 0
    # Forward passes computed every uncached prompt token once and fed back each generated
    # token but the last of each request.
    hits = d("tandem:prefix_cache_hits_total")
    assert d("tandem:prefix_cache_queries_total") == num_prompt
    assert d("tandem:iteration_tokens_total_sum") == num_prompt - hits + num_generated - 5
    assert d("tandem:iteration_tokens_total_count") == d(
        "tandem:iteration_tokens_total_bucket", le="+Inf"
    )
    assert d("tandem:num_preemptions_total") == 0


def test_a_second_identical_prompt_hits_the_prefix_cache(url, engine):
    prompt = "prefix-cache probe: forty bytes of text."
    assert len(encode(prompt)) == 40
    before = scrape(url)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
    httpx.post(f"{url}/v1/completions", json=body, timeout=60).raise_for_status()
    middle = scrape(url)
    httpx.post(f"{url}/v1/completions", json=body, timeout=60).raise_for_status()
    wait_idle(engine)
    first, second = Delta(before, middle), Delta(middle, scrape(url))
    assert first("tandem:prefix_cache_hits_total") == 0  # nothing like it came before
    # The two full pages (32 tokens) are reused; the last page is partial (the last
    # prompt token is always computed, for its logits).
    assert second("tandem:prefix_cache_hits_total") == 32
    assert first("tandem:prefix_cache_queries_total") == 40
    assert second("tandem:prefix_cache_queries_total") == 40


def test_preemption_and_queueing_when_pages_and_slots_run_out(url, engine, raw_engine):
    """6 requests of 20 + 60 tokens (5 pages each at the end) on 4 slots and 12 pages: two
    wait for a slot, and the running ones outgrow the pages, so some are preempted."""
    prompts = [[65 + i] * 20 for i in range(6)]
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    before = scrape(url)

    async def one(i):
        outs = [o async for o in engine.generate(f"crowd-{i}", prompts[i], params)]
        return outs[-1]

    async def main():
        return await asyncio.gather(*(one(i) for i in range(6)))

    finals = asyncio.run(main())
    wait_idle(engine)
    d = Delta(before, scrape(url))
    assert d("tandem:num_preemptions_total") >= 1
    assert d.after[("tandem:num_preemptions_total", ())] == raw_engine.stats()["num_preemptions"]
    # Recomputed tokens are neither prompt nor generation tokens a second time.
    assert d("tandem:prompt_tokens_total") == 6 * 20
    assert d("tandem:generation_tokens_total") == 6 * 60
    assert d("tandem:request_success_total", finished_reason="length") == 6
    times = [f.metrics for f in finals]
    for t in times:
        assert t.arrival_time <= t.first_scheduled_time <= t.first_token_time
        assert t.first_token_time <= t.last_token_time == t.finished_time
    # The two that found no free slot waited at least until the first tokens of those
    # admitted before them (a slot frees only once decoding has started).
    first_token = min(t.first_token_time for t in times)
    for t in sorted(times, key=lambda t: t.first_scheduled_time)[4:]:
        assert t.first_scheduled_time > first_token > t.arrival_time
    # Stats and outputs are plain data: they cross the engine process's pipe intact.
    assert pickle.loads(pickle.dumps(finals)) == finals
    assert pickle.loads(pickle.dumps(raw_engine.stats())) == raw_engine.stats()


def test_an_abandoned_request_counts_as_abort(url, engine):
    before = scrape(url)
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def main():
        gen = engine.generate("abandoned", encode("abandon me"), params)
        await anext(gen)
        await gen.aclose()  # aborts the request

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while Delta(before, scrape(url))("tandem:request_success_total", finished_reason="abort") < 1:
        assert time.monotonic() < deadline, "the abort was never counted"
        time.sleep(0.02)
    d = Delta(before, scrape(url))
    assert d("tandem:request_success_total", finished_reason="abort") == 1
    assert d("tandem:request_success_total", finished_reason="length") == 0


def test_histograms_use_vllm_buckets(url):
    samples = scrape(url)
    ttft = [
        dict(labels)["le"]
        for name, labels in samples
        if name == "tandem:time_to_first_token_seconds_bucket"
    ]
    assert ttft == [str(b) for b in TTFT_BUCKETS] + ["+Inf"]
    assert buckets_1_2_5(128) == [1, 2, 5, 10, 20, 50, 100]
    lengths = [
        dict(labels)["le"]
        for name, labels in samples
        if name == "tandem:request_prompt_tokens_bucket"
    ]
    assert lengths == ["1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "+Inf"]


def test_the_grafana_dashboard_reads_only_exported_series(url):
    bad = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert bad.status_code == 400  # so that tandem_request_errors_total has a series
    exported = {name for name, _ in scrape(url)}
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"tandem[:_][a-z_:]+(?=[{\[)\s,]|$)", e)}
    assert len(names) > 20 and names <= exported, names - exported


def test_scheduler_counts_passes_finishes_and_prefix_hits():
    """Plain Python: the scheduler's counters on hand-computed steps (pages of 4)."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16), BlockManager(16, 4))
    a, b = Sequence("a", list(range(10)), max_num_tokens=13), Sequence("b", [7, 8, 9])
    sched.add(a)
    sched.add(b)
    plan = sched.schedule(lookahead=4)
    sched.scheduled(plan)  # one prefill pass of 10 + 3 = 13 tokens: the "<= 16" bucket
    assert sched.make_stats()["iteration_tokens"] == ([0, 0, 1] + [0] * 11, 13)
    assert sched.num_prefix_cache_queries == 13 and sched.num_prefix_cache_hits == 0
    for seq in (a, b):
        seq.output_token_ids.append(1)
        sched.tokens_arrived(seq, [1], 1)
    # Decode with a lookahead of 4: a may take 13 - 11 = 2 steps, b 4: passes of 2, 2,
    # 1, 1 tokens (one "<= 1" pair, one "<= 8" pair).
    plan = sched.schedule(lookahead=4)
    assert [c.num_tokens for c in plan.chunks] == [2, 4]
    sched.scheduled(plan)
    counts, total = sched.make_stats()["iteration_tokens"]
    assert counts[:3] == [2, 2, 1] and total == 13 + 6
    sched.finish(a, "length")
    sched.finish(b, "abort")
    sched.finish(b, "abort")  # already finished: not counted twice
    stats = sched.make_stats()
    assert stats["num_finished"] == {"stop": 0, "length": 1, "abort": 1, "error": 0}
    assert stats["num_generation_tokens"] == 2
    # Same first 8 tokens as a (two full pages, committed by its prefill): a hit of 8.
    c = Sequence("c", list(range(9)))
    sched.add(c)
    sched.scheduled(sched.schedule())
    assert sched.num_prefix_cache_queries == 13 + 9 and sched.num_prefix_cache_hits == 8
