"""The benchmarks: metrics arithmetic by hand, arrival processes, the fairness and
throughput programs at tiny sizes, and the HTTP load generator over real loopback HTTP
(against a scripted SSE server, and against tandem's own server)."""

import asyncio
import contextlib
import json
import socket
import threading
import time

import numpy as np
import pytest
from flax import nnx

from tandem.bench import fairness, throughput
from tandem.bench import serve as bench_serve
from tandem.bench.common import arrival_times
from tandem.bench.serve import RequestRecord, compute_metrics, parse_goodput
from tandem.model import ModelConfig, Transformer
from tandem.model.tokenizer import byte_tokenizer

SMALL = ModelConfig(
    vocab_size=384,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    max_position_embeddings=128,
)


def record(prompt_len, output_len, ttft, latency, itl):
    return RequestRecord(True, "", prompt_len, output_len, ttft, list(itl), latency)


def test_metrics_by_hand():
    records = [
        record(10, 5, ttft=0.1, latency=0.5, itl=[0.1] * 4),  # TPOT (0.5-0.1)/4 = 100 ms
        record(20, 11, ttft=0.3, latency=2.3, itl=[0.2] * 10),  # TPOT 2.0/10 = 200 ms
        RequestRecord(False, "HTTP 500: boom", 40),  # counts only as failed
        record(30, 1, ttft=0.2, latency=0.2, itl=[]),  # one token: no TPOT
    ]
    m = compute_metrics(records, duration_s=2.0, slos_ms={"ttft": 250, "tpot": 150})
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 17)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["input_throughput"] == pytest.approx(30.0)
    assert m["output_throughput"] == pytest.approx(8.5)
    assert m["total_token_throughput"] == pytest.approx(38.5)
    # TTFT sorted [100, 200, 300]: p99 sits at index 0.99 * 2 = 1.98 -> 200 + 0.98 * 100.
    assert m["ttft_ms"] == pytest.approx({"mean": 200.0, "p50": 200.0, "p99": 298.0})
    # TPOT over the two multi-token requests [100, 200]: p99 = 100 + 0.99 * 100.
    assert m["tpot_ms"] == pytest.approx({"mean": 150.0, "p50": 150.0, "p99": 199.0})
    # ITL pools 4 x 100 and 10 x 200: mean 2400 / 14; the median (index 6.5) is 200.
    assert m["itl_ms"] == pytest.approx({"mean": 2400 / 14, "p50": 200.0, "p99": 200.0})
    assert m["e2el_ms"]["mean"] == pytest.approx(1000.0)
    assert m["e2el_ms"]["p50"] == pytest.approx(500.0)
    # Within ttft <= 250 and tpot <= 150: requests 1 and 4 (request 2's TTFT is 300).
    assert m["request_goodput"] == pytest.approx(2 / 2.0)
    # e2el <= 400 leaves request 4 alone.
    m = compute_metrics(records, 2.0, {"ttft": 250, "tpot": 150, "e2el": 400})
    assert m["request_goodput"] == pytest.approx(0.5)
    assert compute_metrics(records, 2.0)["request_goodput"] is None


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:50.5"]) == {"ttft": 500.0, "tpot": 50.5}
    assert parse_goodput(None) == {}
    for bad in (["itl:5"], ["ttft"], ["ttft:0"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_poisson_arrivals_have_the_rate_and_burstiness_sets_the_variance():
    rng = np.random.default_rng(0)
    rate, n = 10.0, 20_000
    times = arrival_times(n, rate, 1.0, rng)
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # Gamma gaps with shape k: the squared coefficient of variation is 1 / k.
    for k in (0.25, 1.0, 4.0):
        gaps = np.diff(arrival_times(n, rate, k, rng))
        assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
        assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1 / k, rel=0.1)
    assert np.all(arrival_times(5, float("inf"), 1.0, rng) == 0)


def test_vtc_evens_out_service_that_fcfs_gives_by_backlog():
    model = Transformer(SMALL, rngs=nnx.Rngs(0))
    knobs = dict(
        num_steps=60,
        input_len=16,
        output_len=8,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        page_size=8,
    )
    fcfs = fairness.run_fairness(model, byte_tokenizer(), "fcfs", **knobs)
    vtc = fairness.run_fairness(model, byte_tokenizer(), "vtc", **knobs)
    # A keeps 8 waiting, B 2: FCFS serves them about 4:1, VTC about 1:1.
    assert fcfs.ratio > 2.5
    assert abs(vtc.ratio - 1) < abs(fcfs.ratio - 1)
    assert abs(vtc.ratio - 1) < 0.3
    assert vtc.max_difference < fcfs.max_difference
    # Work conserving: both policies serve about the same total.
    assert sum(vtc.service.values()) == pytest.approx(sum(fcfs.service.values()), rel=0.1)


def test_throughput_main_prints_the_table_and_the_ratio(capsys):
    code = throughput.main(
        [
            "--num-prompts",
            "4",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--max-num-batched-tokens",
            "32",
            "--max-num-seqs",
            "4",
            "--num-baseline-prompts",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "Output token throughput (tok/s)" in out
    assert "Engine / no-cache (output tok/s)" in out


def test_no_cache_baseline_matches_the_engine_greedy():
    model = Transformer(SMALL, rngs=nnx.Rngs(1))
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42]]
    llm = throughput.LLM(
        model, byte_tokenizer(), max_num_batched_tokens=32, max_num_seqs=4, page_size=8
    )
    params = throughput.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert throughput.no_cache_generate(model, prompts, 6) == engine


# The HTTP load generator.


@contextlib.contextmanager
def http_server(app):
    """`app` served by uvicorn on a free loopback port, in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


FIRST_S, GAP_S = 0.08, 0.01


def scripted_app(bodies: list):
    """An OpenAI-style SSE server with known timing: the first token after FIRST_S, then one
    every GAP_S; usage counts prompt words; a prompt containing 'fail' gets a 500."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "scripted"}]})

    async def completions(request):
        body = await request.json()
        bodies.append(body)
        if "fail" in body["prompt"]:
            return JSONResponse({"error": {"message": "scripted failure"}}, status_code=500)

        async def events():
            n = body["max_tokens"]
            for i in range(n):
                await asyncio.sleep(FIRST_S if i == 0 else GAP_S)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': 'x'}]})}\n\n"
            usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
    )


def test_serve_bench_against_a_scripted_sse_server(tmp_path):
    bodies = []
    data = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "one two three", "output_len": 4},
        {"prompt": "please fail now"},
        {"prompt": "a b", "output_len": 6},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = tmp_path / "result.json"
    with http_server(scripted_app(bodies)) as url:
        code = bench_serve.main(
            [
                "--base-url",
                url,
                "--dataset",
                "jsonl",
                "--dataset-path",
                str(data),
                "--output-len",
                "5",
                "--num-warmups",
                "0",
                "--goodput",
                "ttft:5000",
                "--result-json",
                str(result),
            ]
        )
    assert code == 0
    assert {b["model"] for b in bodies} == {"scripted"}  # taken from /v1/models
    assert all(
        b["ignore_eos"] and b["stream_options"] == {"include_usage": True} and b["stream"]
        for b in bodies
    )
    saved = json.loads(result.read_text())
    m = saved["metrics"]
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (3 + 2, 4 + 6)
    ok = [r for r in saved["requests"] if r["success"]]
    assert sorted(r["output_len"] for r in ok) == [4, 6]
    for r in ok:
        assert len(r["itl"]) == r["output_len"] - 1  # one gap per text chunk after the first
        assert r["ttft"] >= FIRST_S
        assert r["latency"] >= FIRST_S + GAP_S * (r["output_len"] - 1)
    assert m["request_goodput"] == pytest.approx(2 / m["duration_s"])


def test_serve_bench_against_tandems_openai_server(tmp_path, capsys):
    from tandem.serve.async_engine import AsyncEngine
    from tandem.serve.engine import Engine, EngineConfig
    from tandem.serve.openai_server import build_app

    model = Transformer(SMALL, rngs=nnx.Rngs(0))
    engine = Engine(
        model,
        byte_tokenizer(),
        EngineConfig(page_size=8, max_num_batched_tokens=64, max_num_seqs=8),
        model_name="small",
    )
    async_engine = AsyncEngine(engine)
    result = tmp_path / "result.json"
    try:
        with http_server(build_app(async_engine)) as url:
            code = bench_serve.main(
                [
                    "--base-url",
                    url,
                    "--num-prompts",
                    "8",
                    "--input-len",
                    "16",
                    "--output-len",
                    "8",
                    "--tokenizer",
                    "byte",
                    "--request-rate",
                    "50",
                    "--result-json",
                    str(result),
                ]
            )
    finally:
        async_engine.shutdown()
    assert code == 0
    assert "Successful requests:" in capsys.readouterr().out
    m = json.loads(result.read_text())["metrics"]
    assert (m["completed"], m["failed"]) == (8, 0)
    # Exact lengths: 16-token prompts (byte tokenizer) and ignore_eos with max_tokens 8.
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (8 * 16, 8 * 8)
    assert 0 < m["ttft_ms"]["mean"] <= m["e2el_ms"]["mean"]
