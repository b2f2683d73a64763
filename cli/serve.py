"""`tandem serve MODEL`: the OpenAI-compatible server (serve/openai_server.py's `serve`)."""

from __future__ import annotations

import argparse
import os

from tandem.cli.flags import TENSOR_PARALLEL_FLAG, add_dtype_argument, add_tensor_parallel_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        help="a Hugging Face checkpoint directory or a gin preset (e.g. models/tiny.gin)",
    )
    parser.add_argument("--model", dest="model_flag", help="the same, as a flag")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api_key",
        action="append",
        default=[],
        metavar="KEY[=OWNER]",
        help="accept this Bearer key (repeatable); OWNER is its VTC client. Also read, "
        "comma-separated, from $TANDEM_API_KEYS (keeps keys out of `ps`)",
    )
    parser.add_argument("--served_model_name", default=None)
    add_dtype_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_model_len", type=int, default=None)
    parser.add_argument(
        "--max_num_seqs", type=int, default=None, help="default: 256 on a GPU/TPU, 64 on a CPU"
    )
    parser.add_argument(
        "--max_num_batched_tokens",
        type=int,
        default=None,
        help="tokens per step; default: 8192 on a GPU/TPU, 512 on a CPU",
    )
    parser.add_argument("--page_size", type=int, default=16)
    parser.add_argument("--num_pages", type=int, default=None)
    parser.add_argument("--policy", choices=["fcfs", "priority", "vtc"], default="fcfs")
    add_tensor_parallel_argument(parser)
    parser.add_argument(
        "--engine_process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine loop in its own process, off the HTTP front end's GIL "
        "(--no-engine_process: on a thread of the server's process)",
    )
    parser.add_argument(
        "--warm_up",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile every step shape before serving (default: on a GPU or TPU only)",
    )
    parser.add_argument(
        "--compilation_cache_dir",
        default=None,
        help="JAX's persistent compilation cache: a second start compiles nothing "
        "(default: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/tandem/jax on a GPU or TPU)",
    )
    parser.add_argument("--num_decode_steps", type=int, default=8)
    parser.add_argument(
        "--tool_call_parser",
        "--tool-call-parser",
        default=None,
        metavar="NAME",
        help="how tool calls are read from the model's output: hermes, llama3_json or "
        "mistral (vLLM's names; serve/tool_parsers.py); default: the "
        "one the chat template implies ([TOOL_CALLS] -> mistral, <tool_call> -> hermes, "
        "<|python_tag|> -> llama3_json), else none and tool_choice auto is refused",
    )
    parser.add_argument(
        "--enable_auto_tool_choice",
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve tool_choice auto (the default when a request has tools) with the tool "
        "call parser; on by default, unlike vLLM, whose flag is accepted",
    )
    parser.add_argument("--log_level", default="info")


def api_keys(flags: list[str], env: str) -> dict[str, str]:
    """key -> owner from `--api_key KEY[=OWNER]` flags and the comma-separated `env`."""
    specs = flags + [k for k in env.split(",") if k]
    return dict(k.split("=", 1) if "=" in k else (k, "default") for k in specs)


def run(args: argparse.Namespace) -> int:
    from tandem.serve.openai_server import serve

    model = args.model_flag or args.model
    if not model:
        raise ValueError("tandem serve: give a model (a checkpoint directory or a gin preset)")
    serve(
        model,
        host=args.host,
        port=args.port,
        api_keys=api_keys(args.api_key, os.environ.get("TANDEM_API_KEYS", "")),
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        seed=args.seed,
        log_level=args.log_level,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        page_size=args.page_size,
        num_pages=args.num_pages,
        policy=args.policy,
        tensor_parallel_size=args.tensor_parallel_size,
        tensor_parallel_flag=TENSOR_PARALLEL_FLAG,
        engine_process=args.engine_process,
        warm_up=args.warm_up,
        compilation_cache_dir=args.compilation_cache_dir,
        num_decode_steps=args.num_decode_steps,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
    )
    return 0
