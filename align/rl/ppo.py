"""PPO for language models (InstructGPT / TRL style) with a value head on the policy trunk.

One step: prompts -> engine rollouts with logprobs -> scores (reward functions or a reward
model) at the EOS token, a per-token KL penalty to the frozen reference in the reward
(`ppo_token_rewards`) -> values and old logprobs from one trainer pass -> GAE, whitened
advantages -> `num_ppo_epochs` x `num_mini_batches` clipped policy + value updates inside
one jitted call -> the policy's new params go to the engine by reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tandem.align.algo_configs import PPOConfig
from tandem.align.logprobs import masked_whiten, next_token_entropy, next_token_logprobs
from tandem.align.losses import get_loss
from tandem.align.policy import export_hf, frozen_copy, load_policy
from tandem.align.rl import common
from tandem.align.rl.advantages import gae, ppo_token_rewards
from tandem.align.rl.rollout import derive_seed, generate, to_batch
from tandem.align.train_config import TrainConfig
from tandem.align.trainer import RunResult, build_mesh, fit
from tandem.model.transformer import Transformer


class ActorCritic(nnx.Module):
    """The policy and a scalar value head reading the same trunk (a shared-trunk critic, as
    TRL's AutoModelForCausalLMWithValueHead)."""

    def __init__(self, policy: Transformer, *, rngs: nnx.Rngs):
        self.policy = policy
        dim = policy.config.hidden_size
        dtype = policy.embed.dtype
        self.value_head = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (dim,), dtype), logical_axes=("embed",)
        )
        self.value_bias = nnx.Param(jnp.zeros((), dtype), logical_axes=())

    def __call__(self, tokens: jax.Array):  # i32[B, T] -> (f32[B, T, V], f32[B, T])
        h = self.policy.features(tokens)  # [B, T, D]
        logits = self.policy.logits(h)
        v = jnp.einsum(
            "btd,d->bt",
            self.policy.norm(h),
            self.value_head[...],
            preferred_element_type=jnp.float32,
        )
        v = v + self.value_bias[...]
        # values[:, t] is V of the state before token t, like the logprob of token t.
        values = jnp.pad(v[:, :-1], ((0, 0), (1, 0)))
        return logits, values


class PPO:
    def __init__(
        self,
        cfg: PPOConfig,
        train: TrainConfig,
        model: ActorCritic,
        tokenizer,
        reference,
        fns,
        mesh=None,
    ):
        if train.batch_size % cfg.group_size:
            raise ValueError(
                f"TrainConfig.batch_size ({train.batch_size}) must be a multiple of "
                f"PPOConfig.group_size ({cfg.group_size})"
            )
        if train.batch_size % (cfg.num_mini_batches * train.grad_accum_steps):
            raise ValueError(
                "TrainConfig.batch_size must be a multiple of PPOConfig.num_mini_batches x "
                "TrainConfig.grad_accum_steps"
            )
        self.cfg, self.train, self.tokenizer, self.fns = cfg, train, tokenizer, fns
        self.num_epochs = cfg.num_ppo_epochs
        self.num_minibatches = cfg.num_mini_batches
        self.num_prompts = train.batch_size // cfg.group_size
        self.engine = common.make_engine(
            model.policy,
            tokenizer,
            num_seqs=train.batch_size,
            max_len=cfg.max_prompt_length + cfg.max_completion_length,
            seed=train.seed,
            mesh=mesh,
        )
        graphdef, _ = nnx.split(model)

        def forward(params, tokens):
            logits, values = nnx.merge(graphdef, params)(tokens)
            return next_token_logprobs(logits, tokens, cfg.temperature), values

        self._forward = common.on_mesh(jax.jit(forward), mesh)
        ref_graphdef, self.ref_state = nnx.split(reference)
        self._ref_logps = common.make_logps_fn(ref_graphdef, cfg.temperature, mesh)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def loss(self, model, batch, normalizer, rng):
        del rng
        cfg = self.cfg
        logits, values = model(batch["tokens"])
        logps = next_token_logprobs(logits, batch["tokens"], cfg.temperature)
        mask = batch["completion_mask"]
        entropy = jax.lax.stop_gradient(next_token_entropy(logits, cfg.temperature))
        pg, pg_metrics = get_loss("ppo_policy")(
            logps,
            batch["old_logps"],
            batch["advantages"],
            mask,
            cfg.cliprange,
            normalizer,
            entropy=entropy,
        )
        vf, vf_metrics = get_loss("ppo_value")(
            values, batch["old_values"], batch["returns"], mask, cfg.cliprange_value, normalizer
        )
        metrics = {**pg_metrics, **{f"value/{k}": v for k, v in vf_metrics.items()}}
        metrics.update({"loss/policy": pg, "loss/value": vf})
        return pg + cfg.vf_coef * vf, metrics

    def denominator(self, batch):
        return jnp.sum(batch["completion_mask"])

    def prepare(self, state, data_iter, step):
        cfg = self.cfg
        records = next(data_iter)
        rollouts = generate(
            self.engine,
            [r["prompt_ids"] for r in records],
            group_size=cfg.group_size,
            max_tokens=cfg.max_completion_length,
            temperature=cfg.temperature,
            seed=derive_seed(self.train.seed, step),
        )
        scores, metrics = common.score(
            rollouts,
            [records[g] for g in rollouts.group],
            self.tokenizer,
            self.fns,
            cfg.reward_weights,
        )
        scores = np.nan_to_num(scores, nan=0.0)
        batch = to_batch(rollouts, pad_id=self.pad_id, max_length=None)
        mask = batch["completion_mask"]
        (old_logps, old_values), t_logps = common.timed(
            self._forward, state.params, batch["tokens"]
        )
        ref_logps, t_ref = common.timed(self._ref_logps, self.ref_state, batch["tokens"])
        old_logps, ref_logps, old_values = old_logps * mask, ref_logps * mask, old_values * mask
        rewards = ppo_token_rewards(
            jnp.asarray(scores),
            old_logps,
            ref_logps,
            mask,
            kl_coef=cfg.kl_coef,
            kl_estimator=cfg.kl_estimator,
            missing_eos_penalty=cfg.missing_eos_penalty,
            has_eos=jnp.asarray(batch["has_eos"]),
        )
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask) * mask
        kl = np.asarray(old_logps - ref_logps)[mask > 0]
        metrics.update(common.rollout_metrics(rollouts, batch, scores, old_logps))
        metrics.update(
            {
                "score/mean": float(scores.mean()),
                "kl/policy_ref": float(kl.mean()) if kl.size else 0.0,
                "time/logprobs": t_logps,
                "time/reference": t_ref,
            }
        )
        train_batch = {
            "tokens": batch["tokens"],
            "completion_mask": mask,
            "old_logps": np.asarray(old_logps),
            "old_values": np.asarray(old_values),
            "advantages": np.asarray(advantages),
            "returns": np.asarray(returns),
        }
        return train_batch, metrics

    def after_update(self, state):
        self.engine.update_params(state.params["policy"])
        return {}


def train_ppo(cfg: TrainConfig, ppo: PPOConfig | None = None) -> RunResult:
    ppo = ppo or PPOConfig()
    mesh = build_mesh(cfg)
    policy, tokenizer = load_policy(cfg, mesh)
    reference = frozen_copy(policy)
    # The value head is built on one device; `fit` places it on the mesh with the policy.
    model = ActorCritic(policy, rngs=nnx.Rngs(cfg.seed))
    fns = common.reward_functions(ppo, tokenizer)
    algo = PPO(ppo, cfg, model, tokenizer, reference, fns, mesh)
    data_iter = common.prompt_iterator(
        cfg, tokenizer, num_prompts=algo.num_prompts, max_prompt_length=ppo.max_prompt_length
    )

    def export(module: ActorCritic, run_dir: str) -> None:
        export_hf(tokenizer)(module.policy, run_dir)

    return fit(cfg, model, algo, data_iter, mesh=mesh, export=export)
