"""Zero-copy reads of .safetensors files: each tensor is a numpy view of a memory map.

A loader slices these views per device shard, so no process ever holds a full host copy
of a weight it only needs a piece of. Only safetensors is read; pickle never is.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not fit the model; names the file."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one file as a read-only memory-mapped view."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file (header length "
                f"{header_len} exceeds file size {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else None
    out = {}
    for name, info in header.items():
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}"
            )
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != nbytes or data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} is truncated or its offsets are "
                f"inconsistent (file size {size}, needs {data_start + end})"
            )
        if nbytes == 0:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = mm[data_start + begin : data_start + end].view(dtype).reshape(shape)
    return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"}
    )
