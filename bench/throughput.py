"""`tandem bench throughput`: offline `LLM.generate` on random prompts, against a
no-cache baseline measured in the same run.

The engine run is vLLM's `bench throughput`: N random prompts at once, `ignore_eos`, so
every request makes exactly `--output-len` tokens. The baseline is what a model without a
KV cache does: the training forward re-run over the whole sequence for every new token
(sequences padded to multiples of BASELINE_BUCKET, so it compiles a handful of shapes).
Both are greedy and both are timed after a warm-up pass that compiles their shapes.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tandem.bench.common import add_flag, format_table, sample_lengths
from tandem.model.loading import config_for, load
from tandem.serve.llm import LLM, tensor_parallel_mesh
from tandem.serve.sampling_params import SamplingParams

BASELINE_BUCKET = 32


def random_prompts(
    rng: np.random.Generator, num: int, input_len: int, vocab_size: int, range_ratio: float = 0.0
) -> list[list[int]]:
    return [
        rng.integers(0, vocab_size, size=n).tolist()
        for n in sample_lengths(rng, num, input_len, range_ratio)
    ]


def engine_throughput(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    num_in = sum(len(p) for p in prompts)
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "seconds": seconds,
        "num_requests": len(prompts),
        "input_tokens": num_in,
        "output_tokens": num_out,
        "request_throughput": len(prompts) / seconds,
        "output_throughput": num_out / seconds,
        "total_token_throughput": (num_in + num_out) / seconds,
    }


def no_cache_generate(model, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    """Greedy tokens from the training forward over the full sequence at every step."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def next_tokens(params, tokens, last):  # i32[B, T], i32[B] -> i32[B]
        logits = nnx.merge(graphdef, params)(tokens)  # [B, T, V]
        return jnp.argmax(logits[jnp.arange(tokens.shape[0]), last], axis=-1)

    seqs = [list(p) for p in prompts]
    for _ in range(output_len):
        longest = max(len(s) for s in seqs)
        width = -(-longest // BASELINE_BUCKET) * BASELINE_BUCKET
        # Padding sits after each sequence, so the causal mask keeps it out of the logits read.
        tokens = np.zeros((len(seqs), width), np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = s
        last = np.array([len(s) - 1 for s in seqs], np.int32)
        for s, t in zip(seqs, np.asarray(next_tokens(params, tokens, last)).tolist()):
            s.append(t)
    return [s[len(p) :] for s, p in zip(seqs, prompts)]


def baseline_throughput(model, prompts: list[list[int]], output_len: int) -> dict:
    no_cache_generate(model, prompts, output_len)  # warm-up: compiles every width
    start = time.perf_counter()
    outputs = no_cache_generate(model, prompts, output_len)
    seconds = time.perf_counter() - start
    num_out = sum(len(o) for o in outputs)
    return {
        "seconds": seconds,
        "num_requests": len(prompts),
        "output_tokens": num_out,
        "output_throughput": num_out / seconds,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem bench throughput", description=__doc__.split("\n")[0]
    )
    add_flag(parser, "--model", default="models/tiny.gin", help="checkpoint dir or gin preset")
    add_flag(parser, "--num-prompts", type=int, default=32)
    add_flag(parser, "--input-len", type=int, default=64)
    add_flag(parser, "--output-len", type=int, default=32)
    add_flag(parser, "--range-ratio", type=float, default=0.0)
    add_flag(parser, "--max-num-batched-tokens", type=int, default=512)
    add_flag(parser, "--max-num-seqs", type=int, default=64)
    add_flag(parser, "--page-size", type=int, default=16)
    add_flag(parser, "--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    add_flag(parser, "--seed", type=int, default=0)
    add_flag(
        parser,
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split the heads and FFN over the first N devices",
    )
    add_flag(
        parser,
        "--num-baseline-prompts",
        type=int,
        default=2,
        help="prompts (one batch) for the no-cache baseline; 0 skips it",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mesh = tensor_parallel_mesh(
        config_for(args.model), args.tensor_parallel_size, flag="--tensor-parallel-size"
    )
    model, tokenizer, name = load(args.model, dtype=args.dtype, seed=args.seed, mesh=mesh)
    llm = LLM(
        model,
        tokenizer,
        mesh=mesh,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        page_size=args.page_size,
        seed=args.seed,
    )
    vocab = model.config.vocab_size
    rng = np.random.default_rng(args.seed)
    warmup = random_prompts(rng, args.num_prompts, args.input_len, vocab, args.range_ratio)
    prompts = random_prompts(rng, args.num_prompts, args.input_len, vocab, args.range_ratio)
    # Fresh prompts for the timed pass: the warm-up's would be prefix-cache hits.
    engine_throughput(llm, warmup, args.output_len)
    engine = engine_throughput(llm, prompts, args.output_len)

    rows: list = [
        ("Model", name),
        ("Tensor parallel size", args.tensor_parallel_size),
        ("Requests", engine["num_requests"]),
        ("Input / output tokens", f"{engine['input_tokens']} / {engine['output_tokens']}"),
        ("Elapsed (s)", engine["seconds"]),
        ("Request throughput (req/s)", engine["request_throughput"]),
        ("Output token throughput (tok/s)", engine["output_throughput"]),
        ("Total token throughput (tok/s)", engine["total_token_throughput"]),
    ]
    if args.num_baseline_prompts > 0:
        baseline = baseline_throughput(model, prompts[: args.num_baseline_prompts], args.output_len)
        speedup = engine["output_throughput"] / baseline["output_throughput"]
        rows += [
            f"No-cache recompute, {baseline['num_requests']} prompts in one batch",
            ("Elapsed (s)", baseline["seconds"]),
            ("Output token throughput (tok/s)", baseline["output_throughput"]),
            ("Engine / no-cache (output tok/s)", f"{speedup:.1f}x"),
        ]
    print(format_table("Offline Throughput", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
