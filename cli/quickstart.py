"""`tandem quickstart`: the tiny model trained, saved and served (align/quickstart.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run_dir", default="runs/quickstart")
    parser.add_argument("--fast", action="store_true", help="fewer steps (for tests)")


def run(args: argparse.Namespace) -> int:
    from tandem.align.quickstart import run_quickstart

    return run_quickstart(args.run_dir, fast=args.fast)
