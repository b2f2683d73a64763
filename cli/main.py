"""The `tandem` command: generate, serve, train, plot, quickstart, bench."""

from __future__ import annotations

import argparse
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    """Greedy text through the serving engine (`LLM`), as `tandem serve` would answer."""
    from tandem.serve.llm import LLM, tensor_parallel_mesh
    from tandem.serve.openai_server import TENSOR_PARALLEL_FLAG
    from tandem.serve.sampling_params import SamplingParams

    source = args.model or args.gin_file
    if args.model:
        from tandem.model.hf import load_config

        cfg = load_config(args.model)  # names a missing or bad checkpoint directory
    else:
        from tandem.configs import model_config_from_gin
        from tandem.model.tokenizer import byte_tokenizer

        cfg = model_config_from_gin(args.gin_file, args.gin_param)
        if cfg.vocab_size < len(byte_tokenizer()):
            print(
                f"error: {args.gin_file}: vocab_size {cfg.vocab_size} is smaller than the byte "
                f"tokenizer's {len(byte_tokenizer())}",
                file=sys.stderr,
            )
            return 2
        source = cfg  # the preset with its gin overrides
    mesh = tensor_parallel_mesh(cfg, args.tensor_parallel_size, flag=TENSOR_PARALLEL_FLAG)
    start = time.perf_counter()
    llm = LLM(source, dtype=args.dtype, seed=args.seed, mesh=mesh, max_num_seqs=1,
              max_num_batched_tokens=max(64, args.max_new_tokens))  # fmt: skip
    prompt_ids = llm.engine.tokenizer.encode(args.prompt, add_special_tokens=False)
    if not prompt_ids:
        print("error: --prompt is empty", file=sys.stderr)
        return 2
    [out] = llm.generate(
        [prompt_ids], SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)
    )
    seconds = time.perf_counter() - start
    completion = out.outputs[0]
    what = args.model or f"{args.gin_file} (random weights, seed {args.seed})"
    print(f"model: {what}: {cfg.model_type}, {cfg.num_layers} layers, {cfg.num_params:,} params")
    if mesh is not None:
        print(f"tensor parallel over {mesh.shape['tensor']} devices")
    print(f"prompt: {args.prompt!r}")
    print(f"output: {completion.text!r}")
    print(
        f"{len(completion.token_ids)} tokens in {seconds:.2f} s (greedy, the serving engine, "
        "compile included)"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from tandem.align.cli import run_train

    return run_train(args.algorithm, args.gin_file, args.gin_param)


def _plot(args: argparse.Namespace) -> int:
    from tandem.align.plot import main as plot_main

    return plot_main([args.run_dir] + (["--out", args.out] if args.out else []))


def _quickstart(args: argparse.Namespace) -> int:
    from tandem.align.quickstart import run_quickstart

    return run_quickstart(args.run_dir, fast=args.fast)


def _bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f"tandem.bench.{args.which}").main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    from tandem.serve.openai_server import (
        add_dtype_argument,
        add_serve_arguments,
        add_tensor_parallel_argument,
        run_server,
    )

    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="greedy text from a checkpoint or a gin preset")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--model", help="a Hugging Face checkpoint directory (safetensors)")
    src.add_argument(
        "--gin_file",
        default="models/tiny.gin",
        help="a model preset (path or packaged name); random weights",
    )
    gen.add_argument(
        "--gin_param",
        action="append",
        default=[],
        help="a gin binding, e.g. ModelConfig.num_layers=4 (repeatable)",
    )
    gen.add_argument("--prompt", default="Hello, tandem!")
    gen.add_argument("--max_new_tokens", type=int, default=32)
    add_dtype_argument(gen)
    gen.add_argument("--seed", type=int, default=0)
    add_tensor_parallel_argument(gen)
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    add_serve_arguments(srv)
    srv.set_defaults(func=run_server)

    train = sub.add_parser("train", help="SFT, reward-model, DPO, PPO or GRPO from a gin file")
    train.add_argument("algorithm", choices=["sft", "rm", "dpo", "ppo", "grpo"])
    train.add_argument(
        "--gin_file", action="append", required=True, help="a train config (repeatable)"
    )
    train.add_argument(
        "--gin_param",
        action="append",
        default=[],
        help="a gin binding on top, e.g. TrainConfig.num_steps=10 (repeatable)",
    )
    train.set_defaults(func=_train)

    plot = sub.add_parser("plot", help="draw a run's metrics to PNG files")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="where the PNGs go (default: RUN_DIR/plots)")
    plot.set_defaults(func=_plot)

    quick = sub.add_parser(
        "quickstart",
        help="tiny model: SFT then GRPO on arithmetic, save in HF format, serve one request",
    )
    quick.add_argument("--run_dir", default="runs/quickstart")
    quick.add_argument("--fast", action="store_true", help="fewer steps (for tests)")
    quick.set_defaults(func=_quickstart)

    bench = sub.add_parser(
        "bench",
        help="benchmarks: serve (HTTP load), throughput, fairness, attention (GPU), "
        "engine_e2e (GPU, against HF generate)",
    )
    bench.add_argument(
        "which",
        choices=["serve", "throughput", "fairness", "attention", "engine_e2e", "decode_steady"],
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
