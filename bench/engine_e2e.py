"""`tandem bench engine_e2e`: the engine on a GPU against its roofline and HF `generate`.

The serving engine end to end, against the hardware limit and against Hugging Face
`generate`, both measured in the same run on the same GPU.

A model preset with random bf16 weights serves a workload through `LLM.generate`
(`ignore_eos`, a warm-up pass on other prompts of the same lengths compiles first):

  fixed     `--num-prompts` random prompts of `--input-len` tokens, `--output-len` each
            (default Llama-3.2-1B shape);
  nanovllm  nano-vllm's bench.py: 256 sequences, input and output lengths each uniform in
            100..1024 (seeded numpy rng), each request its own `max_tokens` (default
            Qwen3-0.6B shape; nano-vllm samples at `--temperature 0.6`).

It prints output and total tokens/s, and the roofline: prefill at the bf16 matmul rate (2
FLOPs per weight per prompt token) plus, for every decode step, the weights and the KV of
the sequences still producing at that step, at the copy bandwidth, both rates measured here
by device time (bench/device_time.py), split over `--tensor-parallel-size` GPUs. A profiled
pass gives the GPU busy time (the union of kernel intervals, bench/device_time.py): busy
far below wall means the host, not the GPU, sets the pace.

The peer (`--peer hf`, the default; `--no-peer` skips it) is bench/hf_generate.py: torch
`generate` on the same weights and the timed pass's prompts, on one GPU. It runs first, in
a child process, before this process's JAX starts (and takes 75% of the GPU); the child
saves the random weights and this process loads them, so both run the same bf16 weights.
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

from tandem.bench.common import add_flag, format_table
from tandem.bench.device_time import busy_ns, kernel_intervals, matmul_rate, memory_bandwidth
from tandem.bench.hf_generate import spawn_hf_peer
from tandem.bench.workloads import WORKLOADS, Workload, fixed_workload, nanovllm_workload
from tandem.configs import model_config_from_gin
from tandem.model.hf import load_model
from tandem.model.loading import load
from tandem.model.sharding import make_mesh
from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.llm import LLM
from tandem.serve.sampling_params import SamplingParams

DEFAULT_MODELS = {"fixed": "models/llama3.2-1b.gin", "nanovllm": "models/qwen3-0.6b.gin"}
DEFAULT_NUM_PROMPTS = {"fixed": 128, "nanovllm": 256}
# HF's static batches for variable lengths: 64 x 2048 tokens of Qwen3-0.6B KV is 15 GB,
# and the dynamic cache grows by concatenation, which briefly holds it twice.
DEFAULT_HF_BATCH_SIZE = 64
MAX_NUM_SEQS_CAP = 256
PASSES = ("warmup", "timed", "traced")  # compiles; measured (and the HF peer's); profiled
WEIGHT_SEED = 0


def roofline_seconds(cfg, weight_bytes, *, input_lens, output_lens, tp, flops, bandwidth):
    """Seconds at the hardware limit, split over `tp` devices. Prefill: 2 FLOPs per weight
    (`weight_bytes` of bf16) per prompt token at `flops`. Decode: step i, 0 <= i < the
    longest output, reads the weights once and, for each sequence with more than i
    outputs, the K and V of its input_len + i tokens, at `bandwidth` bytes/s."""
    kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2  # (K, V) x bf16
    prefill = 2 * (weight_bytes / 2) * sum(input_lens) / (tp * flops)
    # A sequence of s prompt and n output tokens reads sum_{i<n} (s + i) = n*s + n(n-1)/2.
    kv_tokens = sum(n * s + n * (n - 1) // 2 for s, n in zip(input_lens, output_lens))
    decode = (max(output_lens) * weight_bytes + kv_tokens * kv_per_token) / (tp * bandwidth)
    return prefill + decode


def make_workload(args: argparse.Namespace) -> Workload:
    num = args.num_prompts or DEFAULT_NUM_PROMPTS[args.workload]
    if args.workload == "nanovllm":
        return nanovllm_workload(args.seed, num)
    return fixed_workload(num, args.input_len, args.output_len)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem bench engine_e2e", description=__doc__.split("\n")[0]
    )
    add_flag(parser, "--workload", choices=WORKLOADS, default="fixed")
    add_flag(parser, "--model", default=None, help="a gin preset (default: by workload)")
    add_flag(parser, "--tensor-parallel-size", type=int, default=1)
    add_flag(parser, "--num-prompts", type=int, default=None, help="default: 128 / 256")
    add_flag(parser, "--input-len", type=int, default=512, help="fixed workload")
    add_flag(parser, "--output-len", type=int, default=128, help="fixed workload")
    add_flag(parser, "--temperature", type=float, default=0.0, help="0: greedy")
    add_flag(parser, "--seed", type=int, default=0, help="of the lengths and prompt tokens")
    add_flag(parser, "--max-num-batched-tokens", type=int, default=2048)
    add_flag(parser, "--max-num-seqs", type=int, default=None, help="default: min(prompts, 256)")
    add_flag(
        parser,
        "--num-decode-steps",
        type=int,
        default=None,
        help="passed to LLM(num_decode_steps=) only when given",
    )
    add_flag(parser, "--peer", choices=["hf", "none"], default="hf")
    add_flag(parser, "--no-peer", dest="peer", action="store_const", const="none")
    add_flag(
        parser,
        "--hf-batch-size",
        type=int,
        default=None,
        help=f"HF static batch (default: every prompt if fixed, else {DEFAULT_HF_BATCH_SIZE})",
    )
    add_flag(parser, "--result-json", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workload = make_workload(args)
    preset = args.model or DEFAULT_MODELS[args.workload]
    cfg = model_config_from_gin(preset)  # gin only: JAX's backend has not started
    rng = np.random.default_rng(args.seed + 1)  # apart from the lengths' stream
    # Fresh tokens per pass: no pass finds its prompts in the prefix cache.
    passes = {name: workload.prompts(rng, cfg.vocab_size) for name in PASSES}
    with tempfile.TemporaryDirectory() as work_dir:
        checkpoint = os.path.join(work_dir, "checkpoint")
        peer, peer_note = None, "off (--no-peer)"
        if args.peer == "hf":
            hf_batch = args.hf_batch_size or (
                None if args.workload == "fixed" else DEFAULT_HF_BATCH_SIZE
            )
            peer, peer_note = spawn_hf_peer(
                model=preset,
                seed=WEIGHT_SEED,
                checkpoint=checkpoint,
                prompts=passes["timed"],
                output_lens=list(workload.output_lens),
                batch_size=hf_batch,
                temperature=args.temperature,
                work_dir=work_dir,
            )
            if peer is None:
                print(f"HF peer {peer_note}", file=sys.stderr)
        if jax.default_backend() != "gpu":
            print(
                f"bench engine_e2e needs a GPU; the backend is {jax.default_backend()}",
                file=sys.stderr,
            )
            return 2
        result = run_tandem(args, cfg, preset, workload, passes, checkpoint, work_dir)
    result.update(hf=peer, hf_note=peer_note)
    result["tandem_over_hf"] = result["out_tok_per_s"] / peer["out_tok_per_s"] if peer else None
    report(result)
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def run_tandem(args, cfg, preset, workload, passes, checkpoint, work_dir) -> dict:
    """Warm-up, timed and profiled passes of `LLM.generate`; the result's numbers."""
    tp = args.tensor_parallel_size
    # Before the engine takes most of the memory for KV pages.
    bandwidth = memory_bandwidth(5)["copy"]
    flops = matmul_rate(5)
    mesh = make_mesh(data=1, fsdp=1, tensor=tp, devices=jax.devices()[:tp]) if tp > 1 else None
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        model = load_model(checkpoint, dtype=jnp.bfloat16, mesh=mesh)  # the HF peer's weights
    else:
        model, _, _ = load(cfg, dtype="bfloat16", seed=WEIGHT_SEED, mesh=mesh)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    max_num_seqs = args.max_num_seqs or min(workload.num_seqs, MAX_NUM_SEQS_CAP)
    engine_kwargs = dict(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=workload.max_model_len,
    )
    if args.num_decode_steps is not None:
        engine_kwargs["num_decode_steps"] = args.num_decode_steps
    llm = LLM(model, byte_tokenizer(), mesh=mesh, **engine_kwargs)
    params = [
        SamplingParams(max_tokens=n, temperature=args.temperature, ignore_eos=True)
        for n in workload.output_lens
    ]
    # The engine's first step meets a fresh (uncommitted) KV pool; with loaded (committed)
    # weights XLA compiles that step apart from every later one, so a one-token request
    # takes it here, not the timed pass.
    llm.generate([[0]], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    llm.generate(passes["warmup"], params, use_tqdm=False)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    outs = llm.generate(passes["timed"], params, use_tqdm=False)
    wall = time.perf_counter() - start
    trace_dir = os.path.join(work_dir, "trace")
    with jax.profiler.trace(trace_dir):
        start = time.perf_counter()
        llm.generate(passes["traced"], params, use_tqdm=False)
        traced = time.perf_counter() - start
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    data = ProfileData.from_file(path)
    busy = [busy_ns(kernel_intervals(data, f"/device:GPU:{d}")) / 1e9 for d in range(tp)]
    ideal = roofline_seconds(
        cfg,
        weight_bytes,
        input_lens=workload.input_lens,
        output_lens=workload.output_lens,
        tp=tp,
        flops=flops,
        bandwidth=bandwidth,
    )
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    if out_tokens != workload.num_output_tokens:
        print(
            f"warning: {out_tokens} output tokens, the workload asked for "
            f"{workload.num_output_tokens}",
            file=sys.stderr,
        )
    return dict(
        model=preset,
        workload=workload.name,
        tp=tp,
        num_seqs=workload.num_seqs,
        input_tokens=workload.num_input_tokens,
        output_tokens=out_tokens,
        temperature=args.temperature,
        max_num_seqs=max_num_seqs,
        num_decode_steps=args.num_decode_steps,
        warmup_s=warmup,
        wall_s=wall,
        out_tok_per_s=out_tokens / wall,
        total_tok_per_s=(out_tokens + workload.num_input_tokens) / wall,
        roofline_s=ideal,
        frac_roofline=ideal / wall,
        traced_wall_s=traced,
        gpu_busy_s=busy,
        copy_Bps=bandwidth,
        matmul_flops=flops,
    )


def report(result: dict) -> None:
    """The JSON line, the one-line summary, then the table against the peer."""
    print(json.dumps(result))
    wall, traced, busy = result["wall_s"], result["traced_wall_s"], max(result["gpu_busy_s"])
    print(
        f"{result['model']} tp={result['tp']} {result['workload']}: {result['num_seqs']} seqs, "
        f"{result['input_tokens']} in, {result['output_tokens']} out tokens in {wall:.2f} s: "
        f"{result['out_tok_per_s']:.0f} out tok/s, {result['total_tok_per_s']:.0f} total "
        f"tok/s; roofline {result['roofline_s']:.3f} s ({100 * result['frac_roofline']:.1f}% "
        f"of it); GPU busy {busy:.2f} s of a profiled {traced:.2f} s pass "
        f"({100 * busy / traced:.0f}%)"
    )
    peer, ratio = result["hf"], result["tandem_over_hf"]
    print(
        format_table(
            "engine_e2e",
            [
                ("workload", result["workload"]),
                ("tandem out tok/s", result["out_tok_per_s"]),
                ("HF out tok/s", peer["out_tok_per_s"] if peer else "n/a"),
                ("tandem / HF", ratio if ratio is not None else "n/a"),
                ("% of roofline", 100 * result["frac_roofline"]),
                ("GPU busy %", 100 * busy / traced),
            ],
        )
    )


if __name__ == "__main__":
    sys.exit(main())
