"""The `tandem` command: generate, serve, train, plot, quickstart, bench."""

from __future__ import annotations

import argparse
import sys

from tandem.cli import bench, generate, plot, quickstart, serve, train

# name -> (the module that adds its flags and runs it, its one-line help)
COMMANDS = {
    "generate": (generate, "greedy text from a checkpoint or a gin preset"),
    "serve": (serve, "an OpenAI-compatible HTTP server"),
    "train": (train, "SFT, reward-model, DPO, PPO or GRPO from a gin file"),
    "plot": (plot, "draw a run's metrics to PNG files"),
    "quickstart": (
        quickstart,
        "tiny model: SFT then GRPO on arithmetic, save in HF format, serve one request",
    ),
    "bench": (
        bench,
        "benchmarks: serve (HTTP load), throughput, fairness, attention (GPU), "
        "engine_e2e (GPU, against HF generate)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help) in COMMANDS.items():
        command = sub.add_parser(name, help=help)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
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
