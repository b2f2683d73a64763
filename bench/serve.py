"""`tandem bench serve`: load on any OpenAI-compatible server, over HTTP only.

vLLM's `vllm bench serve` semantics: requests arrive as a Poisson process at
`--request-rate` (gamma gaps with shape `--burstiness`; inf sends all at once), at most
`--max-concurrency` in flight. Every request streams (SSE) with
`stream_options.include_usage` and `ignore_eos`, so output lengths are the asked ones and
token counts are the server's own. Per request: TTFT (first chunk with text), ITL (gaps
between chunks with text), E2E latency, and tokens from `usage`. Then
TPOT = (E2EL - TTFT) / (output tokens - 1) and goodput = requests/s meeting every SLO.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Sequence

import httpx
import numpy as np

from tandem.bench.common import (
    BenchRequest,
    add_flag,
    arrival_times,
    format_table,
    jsonl_requests,
    random_requests,
    summarize,
)

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclasses.dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    latency: float = 0.0
    start: float = 0.0  # scheduled arrival, seconds after the benchmark began


# Metrics.


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput takes NAME:MS with NAME in {SLO_METRICS}, got {item!r}")
        slos[name] = float(value)
        if slos[name] <= 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be > 0 ms")
    return slos


def request_tpot(r: RequestRecord) -> float:
    """Seconds per output token after the first; 0 for a one-token output."""
    return (r.latency - r.ttft) / (r.output_len - 1) if r.output_len > 1 else 0.0


def compute_metrics(
    records: list[RequestRecord], duration_s: float, slos_ms: dict[str, float] | None = None
) -> dict:
    """Aggregates per-request records (the failed ones count only as failed). Latencies
    come out in ms; TPOT is per request over those with > 1 output token, ITL pools
    every gap; goodput counts the requests within every SLO in `slos_ms`."""
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    ms = 1000.0
    metrics = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "input_throughput": total_in / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "request_goodput": None,
        "ttft_ms": summarize([r.ttft * ms for r in ok]),
        "tpot_ms": summarize([request_tpot(r) * ms for r in ok if r.output_len > 1]),
        "itl_ms": summarize([g * ms for r in ok for g in r.itl]),
        "e2el_ms": summarize([r.latency * ms for r in ok]),
    }
    if slos_ms:
        values = {"ttft": lambda r: r.ttft, "tpot": request_tpot, "e2el": lambda r: r.latency}
        good = [r for r in ok if all(values[k](r) * ms <= slo for k, slo in slos_ms.items())]
        metrics["request_goodput"] = len(good) / duration_s
    return metrics


def metrics_table(metrics: dict, slos_ms: dict[str, float] | None = None) -> str:
    rows: list = [
        ("Successful requests", metrics["completed"]),
        ("Failed requests", metrics["failed"]),
        ("Benchmark duration (s)", metrics["duration_s"]),
        ("Total input tokens", metrics["total_input_tokens"]),
        ("Total generated tokens", metrics["total_output_tokens"]),
        ("Request throughput (req/s)", metrics["request_throughput"]),
    ]
    if metrics["request_goodput"] is not None:
        slo = " ".join(f"{k}:{v:g}" for k, v in (slos_ms or {}).items())
        rows.append(("Goodput SLOs (ms)", slo))
        rows.append(("Request goodput (req/s)", metrics["request_goodput"]))
    rows += [
        ("Input token throughput (tok/s)", metrics["input_throughput"]),
        ("Output token throughput (tok/s)", metrics["output_throughput"]),
        ("Total token throughput (tok/s)", metrics["total_token_throughput"]),
    ]
    names = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2el": "End-to-end Latency",
    }
    for key, title in names.items():
        rows.append(title)
        for stat, value in metrics[f"{key}_ms"].items():
            label = "Mean" if stat == "mean" else f"P{stat[1:]}" if stat != "p50" else "Median"
            rows.append((f"{label} {key.upper()} (ms)", value))
    return format_table("Serving Benchmark Result", rows)


# HTTP.


def _request_body(
    endpoint: str, model: str, req: BenchRequest, ignore_eos: bool, extra: dict | None = None
) -> dict:
    body = {
        "model": model,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.output_len
    return {**body, **(extra or {})}


def _chunk_text(chunk: dict, endpoint: str) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if endpoint == "chat":
            delta = choice.get("delta") or {}
            text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        else:
            text += choice.get("text") or ""
    return text


async def send_request(
    client: httpx.AsyncClient, url: str, body: dict, endpoint: str, req: BenchRequest
) -> RequestRecord:
    """Streams one request; never raises (a failure is a record with `error`)."""
    record = RequestRecord(prompt_len=req.prompt_len or 0)
    start = last = time.perf_counter()
    num_text_chunks = 0
    first = None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                record.error = f"HTTP {response.status_code}: {detail}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = f"stream error: {chunk['error']}"
                    return record
                if _chunk_text(chunk, endpoint):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        record.itl.append(now - last)
                    last = now
                    num_text_chunks += 1
                if usage := chunk.get("usage"):
                    record.prompt_len = usage.get("prompt_tokens", record.prompt_len)
                    record.output_len = usage.get("completion_tokens", 0)
    except (httpx.HTTPError, OSError, ValueError, AttributeError, TypeError) as e:
        # Transport failures, and a body that is not the SSE JSON a server should send.
        record.error = f"{type(e).__name__}: {e}"
        return record
    record.latency = time.perf_counter() - start
    # No text at all (every token an incomplete character): the first came at the end.
    record.ttft = (first if first is not None else start + record.latency) - start
    record.output_len = record.output_len or num_text_chunks  # a server without usage
    record.success = True
    return record


async def first_model(client: httpx.AsyncClient, base_url: str) -> str:
    response = await client.get(f"{base_url}/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run_benchmark(
    base_url: str,
    requests: list[BenchRequest],
    arrivals: np.ndarray,
    *,
    endpoint: str = "completions",
    model: str | None = None,
    max_concurrency: int | None = None,
    api_key: str | None = None,
    ignore_eos: bool = True,
    warmups: Sequence[BenchRequest] = (),
    timeout_s: float = 3600.0,
    extra_body: dict | None = None,
) -> tuple[list[RequestRecord], float, str]:
    """Sends `warmups` one by one, then `requests[i]` at `arrivals[i]` seconds; returns
    (records, duration, model). `extra_body` joins every request's body."""
    base_url = base_url.rstrip("/")
    url = f"{base_url}/{'chat/completions' if endpoint == 'chat' else 'completions'}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # A connection per request in flight, and no pool timeout: a request queued in the
    # pool would count the wait as TTFT.
    limits = httpx.Limits(max_connections=max_concurrency or len(requests))
    timeout = httpx.Timeout(timeout_s, pool=None)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = model or await first_model(client, base_url)

        def send(req: BenchRequest):
            return send_request(
                client,
                url,
                _request_body(endpoint, model, req, ignore_eos, extra_body),
                endpoint,
                req,
            )

        for req in warmups:
            record = await send(req)
            if not record.success:
                raise RuntimeError(f"the warm-up request failed: {record.error}")

        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        start = time.perf_counter()

        async def one(req: BenchRequest, at: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            if semaphore is None:
                record = await send(req)
            else:
                async with semaphore:
                    record = await send(req)
            record.start = at
            return record

        records = await asyncio.gather(*(one(r, t) for r, t in zip(requests, arrivals)))
        return list(records), time.perf_counter() - start, model


# The command.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem bench serve", description=__doc__.split("\n")[0])
    add_flag(parser, "--base-url", default="http://127.0.0.1:8000/v1")
    add_flag(parser, "--model", default=None, help="default: the first of /v1/models")
    add_flag(parser, "--endpoint", choices=["completions", "chat"], default="completions")
    add_flag(parser, "--num-prompts", type=int, default=100)
    add_flag(parser, "--request-rate", type=float, default=math.inf, help="req/s; inf: all at once")
    add_flag(parser, "--burstiness", type=float, default=1.0, help="gamma shape; 1: Poisson")
    add_flag(parser, "--max-concurrency", type=int, default=None)
    add_flag(parser, "--dataset", choices=["random", "jsonl"], default="random")
    add_flag(parser, "--dataset-path", default=None, help="jsonl: lines with prompt[, output_len]")
    add_flag(parser, "--input-len", type=int, default=128)
    add_flag(parser, "--output-len", type=int, default=128)
    add_flag(parser, "--range-ratio", type=float, default=0.0)
    add_flag(
        parser,
        "--tokenizer",
        default=None,
        help="'byte' or a checkpoint directory: random prompts of exact token lengths",
    )
    add_flag(
        parser,
        "--seed",
        type=int,
        default=0,
        help="picks prompts and arrivals; vary it between runs on one server (prefix cache)",
    )
    add_flag(
        parser,
        "--goodput",
        nargs="+",
        default=None,
        metavar="NAME:MS",
        help="SLOs, e.g. ttft:500 tpot:50 e2el:5000",
    )
    add_flag(parser, "--api-key", default=os.environ.get("OPENAI_API_KEY"))
    add_flag(parser, "--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    add_flag(parser, "--num-warmups", type=int, default=1)
    add_flag(parser, "--request-timeout", type=float, default=3600.0, help="seconds")
    add_flag(parser, "--extra-body", type=json.loads, default=None,
             help='JSON merged into every request, e.g. {"response_format": {...}}')  # fmt: skip
    add_flag(parser, "--result-json", default=None)
    return parser


def _load_tokenizer(name: str | None):
    if name is None:
        return None
    from tandem.model.tokenizer import byte_tokenizer, load_tokenizer

    return byte_tokenizer() if name == "byte" else load_tokenizer(name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    slos = parse_goodput(args.goodput)
    rng = np.random.default_rng(args.seed)
    if args.dataset == "jsonl":
        if not args.dataset_path:
            raise ValueError("--dataset jsonl needs --dataset-path")
        requests = jsonl_requests(args.dataset_path, args.num_prompts, args.output_len)
        warmups = requests[:1] * args.num_warmups
    else:
        tokenizer = _load_tokenizer(args.tokenizer)
        # Warm-up prompts of their own: a benchmarked prompt sent before would hit the
        # server's prefix cache.
        warmups, requests = (
            random_requests(rng, n, args.input_len, args.output_len, args.range_ratio, tokenizer)
            for n in (args.num_warmups, args.num_prompts)
        )
    arrivals = arrival_times(len(requests), args.request_rate, args.burstiness, rng)
    print(
        f"bench serve: {len(requests)} requests to {args.base_url} ({args.endpoint}), "
        f"rate {args.request_rate} req/s, burstiness {args.burstiness}, "
        f"max concurrency {args.max_concurrency}",
        flush=True,
    )
    try:
        records, duration, model = asyncio.run(
            run_benchmark(
                args.base_url,
                requests,
                arrivals,
                endpoint=args.endpoint,
                model=args.model,
                max_concurrency=args.max_concurrency,
                api_key=args.api_key,
                ignore_eos=args.ignore_eos,
                warmups=warmups,
                timeout_s=args.request_timeout,
                extra_body=args.extra_body,
            )
        )
    except (RuntimeError, httpx.HTTPError) as e:  # no server, or the warm-up failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    metrics = compute_metrics(records, duration, slos)
    print(metrics_table(metrics, slos))
    errors = sorted({r.error for r in records if not r.success})
    for error in errors[:5]:
        print(f"error: {error}", file=sys.stderr)
    if args.result_json:
        result = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "model": model,
            "args": {
                k: str(v) if isinstance(v, float) and math.isinf(v) else v
                for k, v in vars(args).items()
                if k != "api_key"
            },
            "metrics": metrics,
            "requests": [dataclasses.asdict(r) for r in records],
        }
        with open(args.result_json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if metrics["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
