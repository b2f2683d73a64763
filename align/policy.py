"""The model a run trains: loaded from a checkpoint or built from the gin-bound ModelConfig,
and written back in Hugging Face format at the end so `tandem serve` can load it."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from tandem.align.train_config import TrainConfig
from tandem.model.config import ModelConfig
from tandem.model.sharding import create_sharded
from tandem.model.transformer import Transformer


def load_policy(cfg: TrainConfig, mesh=None) -> tuple[Transformer, object]:
    """(model, tokenizer) for cfg.model: an HF directory, or '' for random weights from the
    ModelConfig the gin file binds, with the byte tokenizer."""
    dtype = jnp.dtype(cfg.dtype)
    if cfg.model:
        from tandem.model.hf import load_model
        from tandem.model.tokenizer import load_tokenizer

        if not os.path.isdir(cfg.model):
            raise FileNotFoundError(f"TrainConfig.model: {cfg.model}: no such directory")
        return load_model(cfg.model, dtype=dtype, mesh=mesh), load_tokenizer(cfg.model)
    from tandem.model.tokenizer import byte_tokenizer

    model_cfg = ModelConfig()
    tokenizer = byte_tokenizer()
    if model_cfg.vocab_size < len(tokenizer):
        raise ValueError(
            f"ModelConfig.vocab_size ({model_cfg.vocab_size}) is smaller than the byte "
            f"tokenizer's {len(tokenizer)} tokens"
        )

    def make():
        return Transformer(model_cfg, dtype=dtype, rngs=nnx.Rngs(cfg.seed))

    model = make() if mesh is None else create_sharded(make, mesh)
    return model, tokenizer


def frozen_copy(model: nnx.Module) -> nnx.Module:
    """An independent copy of `model` for a frozen reference: training donates the policy's
    buffers, so the reference must not share them."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def export_hf(tokenizer):
    """An `export` hook for `fit`: writes the policy to RUN_DIR/hf with its tokenizer."""

    def export(model: Transformer, run_dir: str) -> None:
        from tandem.model.hf import save_model

        out = os.path.join(run_dir, "hf")
        save_model(model, out)
        tokenizer.save_pretrained(out)

    return export
