"""Defaults that reach the hardware: the weights' dtype, the compilation cache, warm-up.

`--dtype auto` takes a checkpoint's own dtype (its config's `torch_dtype`, `dtype` in
newer transformers) and, for a preset with random weights, bfloat16 on a GPU or TPU
(float32 on a CPU, where tests compare against float32 references). The persistent
compilation cache (JAX's) makes a second start of the same model skip XLA compilation;
on an accelerator it is on by default, under ~/.cache/tandem/jax.
"""

from __future__ import annotations

import json
import os

import jax

DTYPES = ("auto", "float32", "bfloat16", "float16")
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def on_accelerator() -> bool:
    return jax.default_backend() in ("gpu", "tpu")


def resolve_dtype(dtype: str, source) -> str:
    """`dtype`, or for "auto" the checkpoint's (an HF directory `source`) or the default
    for random weights (bfloat16 on an accelerator, float32 on a CPU)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    if isinstance(source, str) and os.path.isdir(source):
        path = os.path.join(source, "config.json")
        with open(path) as f:
            config = json.load(f)
        stored = config.get("torch_dtype") or config.get("dtype")
        if stored is not None:
            if stored not in _HF_DTYPES:
                raise ValueError(f"{path}: unsupported dtype {stored!r}; pass --dtype")
            return _HF_DTYPES[stored]
    return "bfloat16" if on_accelerator() else "float32"


def enable_compilation_cache(cache_dir: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache at `cache_dir` (default: the
    JAX_COMPILATION_CACHE_DIR variable, else ~/.cache/tandem/jax on an accelerator, else
    off); returns the folder in use."""
    cache_dir = cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if cache_dir is None and on_accelerator():
        cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "tandem", "jax")
    if cache_dir is None:
        return None
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    return cache_dir


def warm_up_engine(engine, warm_up: bool | None) -> None:
    """Compiles every step shape of `engine` now (None: on an accelerator only, where a
    request must not wait for a compile) and prints how long it took."""
    if warm_up or (warm_up is None and on_accelerator()):
        seconds = engine.warm_up()
        print(f"tandem: compiled every step shape in {seconds:.1f} s", flush=True)
