"""`tandem plot RUN_DIR`: a run's metrics drawn to PNG files (align/plot.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="where the PNGs go (default: RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    from tandem.align.plot import main as plot_main

    return plot_main([args.run_dir] + (["--out", args.out] if args.out else []))
