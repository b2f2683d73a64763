"""One model loader: `load(source)` -> (model, tokenizer, name), for every entry point.

A source is a Hugging Face checkpoint directory (its weights and its tokenizer), a gin
preset (a name such as "tiny", a packaged path such as "models/tiny.gin", or a .gin file)
or a ModelConfig with its gin bindings already applied. The last two build random weights
and pair them with the byte tokenizer: for demos and tests.

`--dtype auto` takes a checkpoint's own dtype (its config's `torch_dtype`, `dtype` in
newer transformers) and, for random weights, bfloat16 on a GPU or TPU (float32 on a CPU,
where tests compare against float32 references).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from tandem.configs import CONFIG_DIR, model_config_from_gin
from tandem.model.config import ModelConfig
from tandem.model.hf import load_config, load_model
from tandem.model.sharding import create_sharded
from tandem.model.transformer import Transformer

if TYPE_CHECKING:  # transformers loads with the tokenizer, not with this module
    from transformers import PreTrainedTokenizerBase

DTYPES = ("auto", "float32", "bfloat16", "float16")
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def on_accelerator() -> bool:
    return jax.default_backend() in ("gpu", "tpu")


def is_checkpoint(source: str) -> bool:
    """True for a checkpoint directory, False for a gin preset (a .gin file, or the name of
    a packaged one such as "tiny"); FileNotFoundError for a source that is neither, named
    as the checkpoint directory it was meant to be."""
    if os.path.isdir(source):
        return True
    if os.path.isfile(source) or source.endswith(".gin"):
        return False
    if os.path.isfile(os.path.join(CONFIG_DIR, "models", f"{source}.gin")):
        return False
    raise FileNotFoundError(f"{source}: no such checkpoint directory")


def config_for(source: str | ModelConfig) -> ModelConfig:
    """The ModelConfig `source` names, without building weights (needs no device)."""
    if isinstance(source, ModelConfig):
        return source
    if is_checkpoint(source):
        return load_config(source)  # names a bad checkpoint directory
    return model_config_from_gin(source)


def tokenizer_for(source: str | ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer `load` pairs with `source`: a checkpoint directory's own, else the
    byte tokenizer. Needs no device (an HTTP front end loads it beside the engine)."""
    from tandem.model.tokenizer import byte_tokenizer, load_tokenizer

    if isinstance(source, str) and is_checkpoint(source):
        return load_tokenizer(source)
    return byte_tokenizer()


def resolve_dtype(dtype: str, source: str | ModelConfig) -> str:
    """`dtype`, or for "auto" the checkpoint's (a directory `source`) or the default for
    random weights (bfloat16 on an accelerator, float32 on a CPU)."""
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


def load(
    source: str | ModelConfig, *, dtype: str = "auto", seed: int = 0, mesh=None
) -> tuple[Transformer, PreTrainedTokenizerBase, str]:
    """(model, tokenizer, name) for `source`. `seed` seeds random weights; with `mesh`, the
    weights are created or read straight into their shards (random weights are those of
    the unsharded build, up to float rounding). ValueError when random weights have fewer
    tokens than the byte tokenizer they come with."""
    dtype = jnp.dtype(resolve_dtype(dtype, source))
    if isinstance(source, str) and is_checkpoint(source):
        model = load_model(source, dtype=dtype, mesh=mesh)
        return model, tokenizer_for(source), os.path.basename(os.path.normpath(source))
    cfg = config_for(source)
    if isinstance(source, ModelConfig):
        name = cfg.model_type
    else:
        name = os.path.splitext(os.path.basename(source))[0]
    tokenizer = tokenizer_for(source)
    if cfg.vocab_size < len(tokenizer):
        raise ValueError(
            f"ModelConfig.vocab_size ({cfg.vocab_size}) is smaller than the byte "
            f"tokenizer's {len(tokenizer)} tokens"
        )

    def make():
        return Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed))

    model = make() if mesh is None else create_sharded(make, mesh)
    return model, tokenizer, name
