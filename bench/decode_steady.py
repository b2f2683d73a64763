"""`tandem bench decode_steady`: the engine's decode-only steady state against its roofline.

End-to-end throughput mixes prefill, compilation and the host's start-up into one number;
this bench isolates one decode step. For each batch size B it runs B random prompts of
`--input-len` tokens (random bf16 weights of a gin preset, greedy, `ignore_eos`) through
`LLM.generate` twice, once for `--short` (N1) and once for `--long` (N2) output tokens,
each after a warm-up pass of the same shape and on fresh prompt tokens (no prefix-cache
hits). Prefill and start-up are the same in both, so

    step = (t(N2) - t(N1)) / (N2 - N1)

is the time of one decode step of B sequences. The hardware limit of that step reads the
weights once and the K and V of every sequence at its mean context, input_len +
(N1 + N2) / 2, at the copy bandwidth measured here before the engine takes memory for KV
pages (bench/device_time.py). Each row prints step / roofline (the target: <= 1.15 at B=1,
<= 1.25 at B=128 and 256); a table of every row comes last.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import numpy as np

from tandem.bench.common import add_flag
from tandem.bench.workloads import fixed_workload
from tandem.configs import model_config_from_gin

# jax, the model and the engine (the tokenizer brings transformers and torch) are imported
# where they run: `--help` and the arithmetic below stay instant, and so do their tests.

WEIGHT_SEED = 0
BF16_BYTES = 2


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one token's K and V over all layers, bf16."""
    return num_layers * 2 * num_kv_heads * head_dim * BF16_BYTES


def differential_step_seconds(t_short: float, t_long: float, n_short: int, n_long: int) -> float:
    """Seconds per decode step from two runs that differ only in output length: prefill,
    the first token and start-up appear in both and cancel."""
    if n_long <= n_short:
        raise ValueError(f"the long output ({n_long}) must exceed the short one ({n_short})")
    return (t_long - t_short) / (n_long - n_short)


def mean_context(input_len: int, n_short: int, n_long: int) -> float:
    """Mean tokens of K/V a sequence holds over the steps that the difference measures
    (input_len + N1 .. input_len + N2, about)."""
    return input_len + (n_short + n_long) / 2


def roofline_step_seconds(
    weight_bytes: int, batch_size: int, context: float, kv_per_token: int, bandwidth: float
) -> float:
    """One decode step at the copy bandwidth: the weights once, plus each of the
    `batch_size` sequences' K/V at `context` tokens."""
    return (weight_bytes + batch_size * context * kv_per_token) / bandwidth


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem bench decode_steady", description=__doc__.split("\n")[0]
    )
    add_flag(parser, "--model", default="models/llama3.2-1b.gin", help="a gin preset")
    add_flag(parser, "--batch-sizes", type=_ints, default=[1, 128, 256], help="e.g. 1,128,256")
    add_flag(parser, "--input-len", type=int, default=512)
    add_flag(parser, "--short", type=int, default=16, help="N1 output tokens")
    add_flag(parser, "--long", type=int, default=144, help="N2 output tokens")
    add_flag(parser, "--repeats", type=int, default=1, help="timed passes per length; min")
    add_flag(parser, "--seed", type=int, default=0, help="of the prompt tokens")
    add_flag(
        parser,
        "--num-decode-steps",
        type=int,
        default=None,
        help="passed to LLM(num_decode_steps=) only when given",
    )
    add_flag(parser, "--result-json", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.short < args.long:
        parser.error(f"need 1 <= --short < --long, got {args.short} and {args.long}")
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.repeats < 1:
        parser.error("--batch-sizes must be positive integers and --repeats at least 1")
    cfg = model_config_from_gin(args.model)  # gin only
    import jax

    if jax.default_backend() != "gpu":
        print(
            f"bench decode_steady needs a GPU; the backend is {jax.default_backend()}",
            file=sys.stderr,
        )
        return 2
    from flax import nnx

    from tandem.bench.device_time import memory_bandwidth
    from tandem.model.loading import load

    # Before any engine takes most of the memory for KV pages.
    bandwidth = memory_bandwidth(5)["copy"]
    model, _, _ = load(cfg, dtype="bfloat16", seed=WEIGHT_SEED)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    if model.lm_head is not None:
        # A decode step reads B rows of an untied input embedding, not the table.
        weight_bytes -= model.embed[...].nbytes
    kv_per_token = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    rng = np.random.default_rng(args.seed)
    rows = []
    for batch_size in args.batch_sizes:
        step = measure_step(args, model, cfg.vocab_size, batch_size, rng)
        context = mean_context(args.input_len, args.short, args.long)
        roofline = roofline_step_seconds(weight_bytes, batch_size, context, kv_per_token, bandwidth)
        row = dict(
            model=args.model,
            batch_size=batch_size,
            input_len=args.input_len,
            short=args.short,
            long=args.long,
            num_decode_steps=args.num_decode_steps,
            **step,
            roofline_s=roofline,
            ratio=step["step_s"] / roofline,
            tok_per_s_per_stream=1 / step["step_s"],
            total_tok_per_s=batch_size / step["step_s"],
            weight_bytes=weight_bytes,
            kv_bytes_per_token=kv_per_token,
            copy_Bps=bandwidth,
        )
        print(json.dumps(row))
        print(
            f"{args.model} B={batch_size}: step {1e3 * row['step_s']:.3f} ms, roofline "
            f"{1e3 * roofline:.3f} ms, step/roofline {row['ratio']:.3f}",
            flush=True,
        )
        rows.append(row)
    print(format_rows(rows))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def measure_step(args, model, vocab_size: int, batch_size: int, rng) -> dict:
    """Wall seconds of `generate` at N1 and N2 output tokens (the min over `--repeats`
    passes, each after a warm-up of its shape), on an engine of its own, and the
    differential step."""
    from tandem.model.tokenizer import byte_tokenizer
    from tandem.serve.llm import LLM
    from tandem.serve.sampling_params import SamplingParams

    engine_kwargs = dict(
        max_num_seqs=max(batch_size, 8),
        max_num_batched_tokens=max(2048, batch_size),
        max_model_len=args.input_len + args.long + 16,
    )
    if args.num_decode_steps is not None:
        engine_kwargs["num_decode_steps"] = args.num_decode_steps
    llm = LLM(model, byte_tokenizer(), **engine_kwargs)
    # The first step meets a fresh KV pool and compiles apart from the later ones.
    llm.generate([[0]], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    seconds = {}
    for n in (args.short, args.long):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        workload = fixed_workload(batch_size, args.input_len, n)
        times = []
        for i in range(1 + args.repeats):  # pass 0 warms up
            # Fresh tokens each pass: the prefix cache must not shorten any prefill.
            prompts = workload.prompts(rng, vocab_size)
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            if i:
                times.append(time.perf_counter() - start)
        num_out = sum(len(o.outputs[0].token_ids) for o in outs)
        if num_out != batch_size * n:
            print(f"warning: {num_out} output tokens, asked for {batch_size * n}", file=sys.stderr)
        seconds[n] = min(times)
    # The engine's KV pool is sized from free memory: the next engine needs this one gone.
    del llm, outs
    gc.collect()
    t_short, t_long = seconds[args.short], seconds[args.long]
    return dict(
        t_short_s=t_short,
        t_long_s=t_long,
        step_s=differential_step_seconds(t_short, t_long, args.short, args.long),
    )


def format_rows(rows: list[dict]) -> str:
    """The closing table: one line per batch size."""
    header = ("model", "B", "step ms", "roofline ms", "ratio", "tok/s/stream", "total tok/s")
    lines = [header] + [
        (
            r["model"],
            str(r["batch_size"]),
            f"{1e3 * r['step_s']:.3f}",
            f"{1e3 * r['roofline_s']:.3f}",
            f"{r['ratio']:.3f}",
            f"{r['tok_per_s_per_stream']:.1f}",
            f"{r['total_tok_per_s']:.0f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))
        )
        for line in lines
    )


if __name__ == "__main__":
    sys.exit(main())
