"""`tandem bench WHICH [FLAGS]`: runs bench/WHICH.py's `main` with the flags after WHICH."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = (
    "serve",
    "throughput",
    "fairness",
    "attention",
    "engine_e2e",
    "decode_steady",
    "grammar_mask",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", choices=BENCHMARKS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(f"tandem.bench.{args.which}").main(args.rest)
