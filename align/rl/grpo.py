"""GRPO and its relatives (DAPO, Dr. GRPO, GSPO) with rollouts from the serving engine.

One step: draw prompts -> the engine samples `group_size` completions of each (the group's
prompt pages are shared) with per-token logprobs -> rewards -> group-normalised advantages ->
old logprobs recomputed by the trainer (`time/logprobs`) and, with beta > 0, the frozen
reference's (`time/reference`) -> `num_iterations` jitted updates -> the new params are
handed to the engine by reference (`time/handoff`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tandem.align.algo_configs import GRPOConfig
from tandem.align.logprobs import next_token_entropy, next_token_logprobs
from tandem.align.losses import get_loss, loss_denominator
from tandem.align.policy import export_hf, frozen_copy, load_policy
from tandem.align.rl import common
from tandem.align.rl.advantages import get_advantage, soft_overlong_penalty
from tandem.align.rl.rollout import PromptBatch, derive_seed, dynamic_sample, generate, to_batch
from tandem.align.train_config import TrainConfig
from tandem.align.trainer import RunResult, build_mesh, fit


class GRPO:
    def __init__(
        self, cfg: GRPOConfig, train: TrainConfig, model, tokenizer, reference, fns, mesh=None
    ):
        if train.batch_size % cfg.group_size:
            raise ValueError(
                f"TrainConfig.batch_size ({train.batch_size}) must be a multiple of "
                f"GRPOConfig.group_size ({cfg.group_size})"
            )
        self.cfg, self.train, self.tokenizer, self.fns = cfg, train, tokenizer, fns
        self.loss_cfg = cfg.loss_config()
        self.num_epochs = cfg.num_iterations
        self.num_prompts = train.batch_size // cfg.group_size
        self.max_length = cfg.max_prompt_length + cfg.max_completion_length
        self.engine = common.make_engine(
            model,
            tokenizer,
            num_seqs=train.batch_size,
            max_len=self.max_length,
            seed=train.seed,
            mesh=mesh,
        )
        graphdef, _ = nnx.split(model)
        self._logps = common.make_logps_fn(graphdef, cfg.temperature, mesh)
        self.reference = reference
        if reference is not None:
            ref_graphdef, self.ref_state = nnx.split(reference)
            self._ref_logps = common.make_logps_fn(ref_graphdef, cfg.temperature, mesh)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # The jitted part.

    def loss(self, model, batch, normalizer, rng):
        del rng
        logits = model(batch["tokens"])
        logps = next_token_logprobs(logits, batch["tokens"], self.cfg.temperature)
        entropy = jax.lax.stop_gradient(next_token_entropy(logits, self.cfg.temperature))
        return get_loss("grpo")(
            logps,
            batch["old_logps"],
            batch["advantages"],
            batch["completion_mask"],
            ref_logps=batch.get("ref_logps"),
            engine_logps=batch["engine_logps"] if self.loss_cfg.tis_cap else None,
            cfg=self.loss_cfg,
            normalizer=normalizer,
            entropy=entropy,
        )

    def denominator(self, batch):
        return loss_denominator(
            batch["completion_mask"],
            self.loss_cfg.loss_agg,
            max_completion_length=self.cfg.max_completion_length,
        )

    # The host part.

    def _sample_kwargs(self):
        cfg = self.cfg
        return dict(
            group_size=cfg.group_size,
            max_tokens=cfg.max_completion_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
        )

    def _rewards(self, rollouts, rows):
        rewards, metrics = common.score(
            rollouts, rows, self.tokenizer, self.fns, self.cfg.reward_weights
        )
        if self.cfg.overlong_cache_length:
            lengths = jnp.asarray([len(c) for c in rollouts.completion_ids])
            penalty = soft_overlong_penalty(
                lengths, self.cfg.max_completion_length, self.cfg.overlong_cache_length
            )
            rewards = rewards + np.asarray(penalty)
            metrics["reward/overlong_penalty"] = float(np.mean(penalty))
        return rewards, metrics

    def prepare(self, state, data_iter, step):
        seed = derive_seed(self.train.seed, step)
        if not self.cfg.dynamic_sampling:
            records = next(data_iter)
            prompt_ids = [r["prompt_ids"] for r in records]
            rollouts = generate(self.engine, prompt_ids, seed=seed, **self._sample_kwargs())
            rewards, metrics = self._rewards(rollouts, [records[g] for g in rollouts.group])
            return self._finish_batch(state, rollouts, rewards, metrics)
        # DAPO dynamic sampling: every drawn record gets a global row number, carried through
        # the sampler as a column, so rewards see the record of each kept completion.
        seen: list[dict] = []

        def batches():
            while True:
                records = next(data_iter)
                rows = list(range(len(seen), len(seen) + len(records)))
                seen.extend(records)
                yield PromptBatch([r["prompt_ids"] for r in records], {"row": rows})

        def reward_fn(rollouts, columns):
            return self._rewards(rollouts, [seen[i] for i in columns["row"]])[0]

        sample = dynamic_sample(
            self.engine,
            batches(),
            reward_fn,
            num_groups=self.num_prompts,
            max_tries=self.cfg.max_sampling_tries,
            seed=seed,
            **self._sample_kwargs(),
        )
        if sample.rollouts.num_groups < self.num_prompts:
            raise RuntimeError(
                f"step {step + 1}: dynamic sampling kept {sample.rollouts.num_groups} of "
                f"{self.num_prompts} groups in {sample.num_tries} tries; raise "
                "GRPOConfig.max_sampling_tries"
            )
        _, metrics = self._rewards(sample.rollouts, [seen[i] for i in sample.columns["row"]])
        metrics["dynamic_sampling/tries"] = sample.num_tries
        metrics["dynamic_sampling/dropped_groups"] = sample.num_dropped_groups
        return self._finish_batch(state, sample.rollouts, sample.rewards, metrics)

    def _finish_batch(self, state, rollouts, rewards, metrics):
        batch = to_batch(rollouts, pad_id=self.pad_id, max_length=None)
        group_size = self.cfg.group_size
        usable = np.nan_to_num(rewards, nan=0.0)
        advantages = np.asarray(
            get_advantage(self.cfg.advantage)(
                jnp.asarray(usable),
                group_size,
                scale=self.cfg.scale_rewards,
                epsilon=self.cfg.advantage_epsilon,
            )
        )
        advantages = np.where(np.isnan(rewards), 0.0, advantages).astype(np.float32)
        old_logps, t_logps = common.timed(self._logps, state.params, batch["tokens"])
        batch["old_logps"] = old_logps * batch["completion_mask"]
        t_ref = 0.0
        if self.reference is not None and self.loss_cfg.beta:
            ref, t_ref = common.timed(self._ref_logps, self.ref_state, batch["tokens"])
            batch["ref_logps"] = ref * batch["completion_mask"]
        batch["advantages"] = advantages
        grouped = usable.reshape(-1, group_size)
        metrics.update(common.rollout_metrics(rollouts, batch, rewards, batch["old_logps"]))
        metrics.update(
            {
                "frac_reward_zero_std": float(np.mean(grouped.std(axis=1) == 0)),
                "time/logprobs": t_logps,
                "time/reference": t_ref,
            }
        )
        train_batch = {
            k: batch[k]
            for k in ("tokens", "completion_mask", "engine_logps", "old_logps", "advantages")
        }
        if "ref_logps" in batch:
            train_batch["ref_logps"] = batch["ref_logps"]
        return train_batch, metrics

    def after_update(self, state):
        self.engine.update_params(state.params)
        return {}


def train_grpo(cfg: TrainConfig, grpo: GRPOConfig | None = None) -> RunResult:
    grpo = grpo or GRPOConfig()
    if cfg.grad_accum_steps != 1 and cfg.batch_size % (cfg.grad_accum_steps * grpo.group_size):
        raise ValueError("TrainConfig.batch_size must split into whole groups per micro-batch")
    mesh = build_mesh(cfg)
    model, tokenizer = load_policy(cfg, mesh)
    loss_cfg = grpo.loss_config()
    reference = frozen_copy(model) if loss_cfg.beta else None
    fns = common.reward_functions(grpo, tokenizer)
    algo = GRPO(grpo, cfg, model, tokenizer, reference, fns, mesh)
    data_iter = common.prompt_iterator(
        cfg, tokenizer, num_prompts=algo.num_prompts, max_prompt_length=grpo.max_prompt_length
    )
    return fit(cfg, model, algo, data_iter, mesh=mesh, export=export_hf(tokenizer))
