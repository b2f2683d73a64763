"""Flags that more than one command takes: the weights' dtype and tensor parallelism."""

from __future__ import annotations

import argparse

TENSOR_PARALLEL_FLAG = "--tensor_parallel_size"


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """`--dtype auto` (the checkpoint's; bfloat16 for a preset on a GPU or TPU)."""
    from tandem.model.loading import DTYPES

    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="the weights' dtype; auto: the checkpoint's own, or bfloat16 for a preset "
        "on a GPU or TPU (float32 on a CPU)",
    )


def add_tensor_parallel_argument(parser: argparse.ArgumentParser) -> None:
    """`--tensor_parallel_size N`, with vLLM's `--tensor-parallel-size` as an alias."""
    parser.add_argument(
        TENSOR_PARALLEL_FLAG,
        "--tensor-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="split the attention heads and FFN over the first N devices (tensor parallel)",
    )
