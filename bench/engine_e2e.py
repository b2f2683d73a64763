"""`python -m tandem.bench.engine_e2e`: the serving engine end to end on a GPU, against
the hardware limit measured in the same run.

A model preset with random bf16 weights serves `--num-prompts` random prompts of
`--input-len` tokens, greedy, `ignore_eos`, `--output-len` tokens each, through
`LLM.generate` (a warm-up pass on other prompts compiles first). It prints output and
total tokens/s, and the roofline: prefill at the bf16 matmul rate (2 FLOPs per weight
per prompt token) plus, for every decode step, the weights and the KV read so far at the
copy bandwidth, both rates measured here by device time (bench/attention.py), split over
`--tensor-parallel-size` GPUs. A second, profiled pass gives the GPU busy time (the union
of kernel intervals, bench/device_time.py): busy far below wall means the host, not the
GPU, sets the pace.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.profiler import ProfileData

from tandem.bench.attention import matmul_rate, memory_bandwidth
from tandem.bench.device_time import busy_ns, kernel_intervals
from tandem.bench.throughput import random_prompts
from tandem.configs import model_config_from_gin
from tandem.model.sharding import create_sharded, make_mesh
from tandem.model.tokenizer import byte_tokenizer
from tandem.model.transformer import Transformer
from tandem.serve.llm import LLM
from tandem.serve.sampling_params import SamplingParams


def roofline_seconds(cfg, weight_bytes, *, num, input_len, output_len, tp, flops, bandwidth):
    prefill = 2 * (weight_bytes / 2) * num * input_len / (tp * flops)
    kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    decode = sum(
        (weight_bytes + num * (input_len + i) * kv_per_token) / (tp * bandwidth)
        for i in range(output_len)
    )
    return prefill + decode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.bench.engine_e2e")
    parser.add_argument("--model", default="models/llama3.2-1b.gin", help="a gin preset")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--result-json", default=None)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(
            f"bench engine_e2e needs a GPU; the backend is {jax.default_backend()}", file=sys.stderr
        )
        return 2
    tp, num = args.tensor_parallel_size, args.num_prompts
    # Before the engine takes most of the memory for KV pages.
    bandwidth = memory_bandwidth(5)["copy"]
    flops = matmul_rate(5)
    cfg = model_config_from_gin(args.model)
    mesh = make_mesh(data=1, fsdp=1, tensor=tp, devices=jax.devices()[:tp]) if tp > 1 else None

    def make():
        return Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))

    model = create_sharded(make, mesh) if mesh else make()
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    llm = LLM(
        model,
        byte_tokenizer(),
        mesh=mesh,
        max_num_seqs=num,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.input_len + args.output_len,
    )
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    def prompts():
        return random_prompts(rng, num, args.input_len, cfg.vocab_size)

    start = time.perf_counter()
    llm.generate(prompts(), params, use_tqdm=False)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    outs = llm.generate(prompts(), params, use_tqdm=False)
    wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            llm.generate(prompts(), params, use_tqdm=False)
            traced = time.perf_counter() - start
        path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
        data = ProfileData.from_file(path)
    busy = [busy_ns(kernel_intervals(data, f"/device:GPU:{d}")) / 1e9 for d in range(tp)]
    ideal = roofline_seconds(
        cfg,
        weight_bytes,
        num=num,
        input_len=args.input_len,
        output_len=args.output_len,
        tp=tp,
        flops=flops,
        bandwidth=bandwidth,
    )
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = dict(
        model=args.model,
        tp=tp,
        warmup_s=warmup,
        wall_s=wall,
        out_tok_per_s=out_tokens / wall,
        total_tok_per_s=(out_tokens + num * args.input_len) / wall,
        roofline_s=ideal,
        frac_roofline=ideal / wall,
        traced_wall_s=traced,
        gpu_busy_s=busy,
        copy_Bps=bandwidth,
        matmul_flops=flops,
    )
    print(json.dumps(result))
    print(
        f"{args.model} tp={tp}: {num} x ({args.input_len} in, {args.output_len} out) in "
        f"{wall:.2f} s: {out_tokens / wall:.0f} out tok/s, "
        f"{result['total_tok_per_s']:.0f} total tok/s; roofline {ideal:.3f} s "
        f"({100 * ideal / wall:.1f}% of it); GPU busy {max(busy):.2f} s of a profiled "
        f"{traced:.2f} s pass ({100 * max(busy) / traced:.0f}%)"
    )
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
