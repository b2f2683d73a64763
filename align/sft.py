"""Supervised fine-tuning: next-token cross-entropy on completion tokens, optionally packed.

Rows are `tokens i32[B, T]` with `loss_mask f32[B, T]` marking the tokens to predict; packed
rows add `segment_ids` and `positions`, so attention and positions restart per example and
a packed batch computes the same loss as the unpacked one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tandem.align import data
from tandem.align.algo_configs import SFTConfig
from tandem.align.logprobs import next_token_logprobs
from tandem.align.losses import get_loss
from tandem.align.policy import export_hf, load_policy
from tandem.align.train_config import TrainConfig
from tandem.align.trainer import RunResult, build_mesh, fit


def target_mask(batch: dict) -> jax.Array:  # f32[B, T]
    """The loss mask without column 0: the first token of a row is never predicted."""
    mask = batch["loss_mask"].astype(jnp.float32)
    return mask.at[:, 0].set(0.0)


class SFT:
    def loss(self, model, batch, normalizer, rng):
        del rng
        logits = model(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
        logps = next_token_logprobs(logits, batch["tokens"])  # [B, T]
        return get_loss("sft")(logps, target_mask(batch), normalizer=normalizer)

    def denominator(self, batch):
        return jnp.sum(target_mask(batch))

    def prepare(self, state, data_iter, step):
        return next(data_iter), {}

    def after_update(self, state):
        return {}


def train_sft(cfg: TrainConfig, sft: SFTConfig | None = None) -> RunResult:
    sft = sft or SFTConfig()
    mesh = build_mesh(cfg)
    model, tokenizer = load_policy(cfg, mesh)
    records = data.read_records(cfg.train_file)
    dataset = data.make_dataset(
        records,
        functools.partial(data.tokenize_sft, tokenizer=tokenizer, max_length=cfg.max_length),
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        pack_length=cfg.max_length if sft.packing else None,
    )
    return fit(cfg, model, SFT(), iter(dataset), mesh=mesh, export=export_hf(tokenizer))
