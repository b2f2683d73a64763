"""Preference pairs: the batches DPO and reward models train on, and their row layout.

A batch holds `chosen_tokens`, `chosen_mask`, `rejected_tokens`, `rejected_mask`, each
[B, T] (masks mark the completion tokens); `pair_rows` stacks the two sides into one [2B, T]
batch, chosen first, so a model sees both in one call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tandem.align import data
from tandem.align.train_config import TrainConfig


def preference_batches(cfg: TrainConfig, tokenizer):
    """The checkpointable iterator of tokenised pairs that DPO and reward models train on;
    every row's layout is checked before training starts."""
    records = data.read_records(cfg.train_file, layout="preference")
    dataset = data.make_dataset(
        records,
        functools.partial(data.tokenize_preference, tokenizer=tokenizer, max_length=cfg.max_length),
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    return iter(dataset)


def pair_rows(batch: dict) -> tuple[jax.Array, jax.Array]:  # i32[2B, T], f32[2B, T]
    """The chosen rows, then the rejected rows: tokens and the completion mask as f32."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]]).astype(jnp.float32)
    return tokens, mask
