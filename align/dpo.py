"""Direct preference optimisation and its reference-free relatives (SimPO, ORPO).

`DPOConfig.loss` picks one: 'dpo' (any `loss_type`, against a frozen copy of the initial
policy), 'simpo' (length-averaged logps, margin `simpo_gamma`) or 'orpo' (chosen NLL plus the
odds-ratio term); the last two build no reference. All three run from the same gin file:
`tandem train dpo --gin_file train/dpo_tiny.gin --gin_param "DPOConfig.loss='simpo'"`.

A batch holds pairs: `chosen_tokens`, `chosen_mask`, `rejected_tokens`, `rejected_mask`, each
[B, T] (masks mark the completion tokens). The frozen reference's summed logps are computed
in `prepare` (timed as `time/reference`), so the jitted step differentiates the policy only.
Chosen and rejected rows go through the model as one [2B, T] batch.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tandem.align.algo_configs import NEEDS_REFERENCE, DPOConfig
from tandem.align.data.preference import pair_rows, preference_batches
from tandem.align.logprobs import next_token_logprobs
from tandem.align.losses import get_loss
from tandem.align.policy import export_hf, frozen_copy, load_policy
from tandem.align.train_config import TrainConfig
from tandem.align.trainer import RunResult, build_mesh, fit


def completion_logps(model, tokens, mask):
    """Per-token logps of the completion tokens: f32[B, T] (0 off the mask)."""
    logps = next_token_logprobs(model(tokens), tokens)
    return logps * mask.at[:, 0].set(0)


class DPO:
    def __init__(self, cfg: DPOConfig, reference: nnx.Module | None):
        self.cfg = cfg
        self.reference = reference
        if reference is not None:
            graphdef, self.ref_state = nnx.split(reference)

            def ref_logps(state, tokens, mask):  # [2B] summed logps under the reference
                return jnp.sum(completion_logps(nnx.merge(graphdef, state), tokens, mask), -1)

            self._ref_logps = jax.jit(ref_logps)

    def loss(self, model, batch, normalizer, rng):
        del rng
        cfg = self.cfg
        tokens, mask = pair_rows(batch)
        logps = completion_logps(model, tokens, mask)  # [2B, T]
        num_pairs = batch["chosen_tokens"].shape[0]
        sums = jnp.sum(logps, -1)
        lengths = jnp.maximum(jnp.sum(mask.at[:, 0].set(0), -1), 1.0)
        chosen, rejected = sums[:num_pairs], sums[num_pairs:]
        if cfg.loss == "dpo":
            return get_loss("dpo")(
                chosen,
                rejected,
                batch["ref_chosen_logps"],
                batch["ref_rejected_logps"],
                beta=cfg.beta,
                loss_type=cfg.loss_type,
                label_smoothing=cfg.label_smoothing,
                chosen_lengths=lengths[:num_pairs],
                rejected_lengths=lengths[num_pairs:],
                normalizer=normalizer,
            )
        avg = sums / lengths
        if cfg.loss == "simpo":
            return get_loss("simpo")(
                avg[:num_pairs],
                avg[num_pairs:],
                beta=cfg.beta,
                gamma=cfg.simpo_gamma,
                label_smoothing=cfg.label_smoothing,
                normalizer=normalizer,
            )
        token_mask = mask.at[:, 0].set(0)
        return get_loss("orpo")(
            logps[:num_pairs],
            token_mask[:num_pairs],
            logps[num_pairs:],
            token_mask[num_pairs:],
            beta=cfg.beta,
            normalizer=normalizer,
            nll_normalizer=batch["num_chosen_tokens"][0],
        )

    def denominator(self, batch):
        return jnp.asarray(batch["chosen_tokens"].shape[0], jnp.float32)

    def prepare(self, state, data_iter, step):
        data_batch = next(data_iter)
        if self.cfg.loss == "orpo":
            # ORPO's NLL term divides by the whole batch's chosen tokens; a per-row copy
            # survives the cut into micro-batches.
            chosen_mask = np.asarray(data_batch["chosen_mask"])[:, 1:]
            count = np.full(len(chosen_mask), chosen_mask.sum(), np.float32)
            data_batch = dict(data_batch, num_chosen_tokens=count)
        if self.reference is None:
            return data_batch, {}
        t0 = time.perf_counter()
        tokens, mask = pair_rows(jax.tree.map(jnp.asarray, data_batch))
        ref = np.asarray(self._ref_logps(self.ref_state, tokens, mask))
        num_pairs = len(data_batch["chosen_tokens"])
        batch = dict(
            data_batch, ref_chosen_logps=ref[:num_pairs], ref_rejected_logps=ref[num_pairs:]
        )
        return batch, {"time/reference": time.perf_counter() - t0}

    def after_update(self, state):
        return {}


def train_dpo(cfg: TrainConfig, dpo: DPOConfig | None = None) -> RunResult:
    dpo = dpo or DPOConfig()
    mesh = build_mesh(cfg)
    model, tokenizer = load_policy(cfg, mesh)
    reference = frozen_copy(model) if NEEDS_REFERENCE[dpo.loss] else None
    return fit(
        cfg,
        model,
        DPO(dpo, reference),
        preference_batches(cfg, tokenizer),
        mesh=mesh,
        export=export_hf(tokenizer),
    )
