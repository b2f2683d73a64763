"""`tandem generate`: greedy text through the serving engine (`LLM`), as `tandem serve`
would answer."""

from __future__ import annotations

import argparse
import sys
import time

from tandem.cli.flags import TENSOR_PARALLEL_FLAG, add_dtype_argument, add_tensor_parallel_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", help="a Hugging Face checkpoint directory (safetensors)")
    src.add_argument(
        "--gin_file",
        default="models/tiny.gin",
        help="a model preset (path or packaged name); random weights",
    )
    parser.add_argument(
        "--gin_param",
        action="append",
        default=[],
        help="a gin binding, e.g. ModelConfig.num_layers=4 (repeatable)",
    )
    parser.add_argument("--prompt", default="Hello, tandem!")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    add_dtype_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    add_tensor_parallel_argument(parser)


def run(args: argparse.Namespace) -> int:
    from tandem.configs import model_config_from_gin
    from tandem.model.loading import config_for
    from tandem.serve.llm import LLM, tensor_parallel_mesh
    from tandem.serve.sampling_params import SamplingParams

    # A preset with its gin overrides applied, or a checkpoint directory.
    source = args.model or model_config_from_gin(args.gin_file, args.gin_param)
    cfg = config_for(source)  # names a missing or bad checkpoint directory
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
