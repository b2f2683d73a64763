"""The model a run trains: loaded from a checkpoint or built from the gin-bound ModelConfig,
and written back in Hugging Face format at the end so `tandem serve` can load it."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from tandem.align.train_config import TrainConfig
from tandem.model.config import ModelConfig
from tandem.model.loading import load
from tandem.model.transformer import Transformer


def load_policy(cfg: TrainConfig, mesh=None) -> tuple[Transformer, object]:
    """(model, tokenizer) for cfg.model: an HF directory, or '' for random weights from the
    ModelConfig the gin file binds, with the byte tokenizer."""
    if cfg.model and not os.path.isdir(cfg.model):
        raise FileNotFoundError(f"TrainConfig.model: {cfg.model}: no such directory")
    source = cfg.model or ModelConfig()
    model, tokenizer, _ = load(source, dtype=cfg.dtype, seed=cfg.seed, mesh=mesh)
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
