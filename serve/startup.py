"""Defaults that reach the hardware: the batch size, the compilation cache and warm-up (the
weights' dtype, `--dtype auto`, is model/loading.py's `resolve_dtype`).

The persistent compilation cache (JAX's) makes a second start of the same model skip XLA
compilation; on an accelerator it is on by default, under ~/.cache/tandem/jax.
"""

from __future__ import annotations

import os

import jax

from tandem.model.loading import on_accelerator

# `tandem serve`'s batch when its flags leave it open: vLLM's online-serving defaults on a
# GPU or TPU (8192 tokens per step; 256 sequences, V0's, which our slot buckets cover in
# six compilations), small ones on a CPU, where steps are slow and compiles dear.
ACCELERATOR_BATCH = dict(max_num_seqs=256, max_num_batched_tokens=8192)
CPU_BATCH = dict(max_num_seqs=64, max_num_batched_tokens=512)


def serving_defaults(engine_config: dict) -> dict:
    """`engine_config` with its None batch fields (max_num_seqs, max_num_batched_tokens)
    set for this process's platform."""
    defaults = ACCELERATOR_BATCH if on_accelerator() else CPU_BATCH
    return {**engine_config, **{k: v for k, v in defaults.items() if engine_config.get(k) is None}}


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
