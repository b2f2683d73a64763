"""The GRPO-family loss against TRL's _compute_loss, the accumulation contract, the on-policy
gradient, presets, validation and the registry. (veRL parity: test_losses_verl.py.)"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trl_reference import grpo_compute_loss, vllm_is_token_truncate

from tandem.align import registry
from tandem.align.losses import (
    DAPO,
    DEEPSEEKMATH_GRPO,
    DR_GRPO,
    TRL_GRPO,
    PolicyLossConfig,
    get_loss,
    kl_estimate,
    loss_denominator,
    policy_gradient_loss,
)

B, T = 8, 12
# Row lengths: full rows, short rows, a single-token row and an empty row (TRL keeps it in
# the grpo mean as a zero).
LENGTHS = np.array([12, 7, 1, 0, 5, 12, 3, 9])
MASK = (np.arange(T)[None, :] < LENGTHS[:, None]).astype(np.float32)  # [B, T]
POLICY_AGGS = ("grpo", "bnpo", "dapo", "dr_grpo", "seq_sum")


def close(actual, expected, rtol=2e-6, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def make_batch(seed: int, token_advantages: bool = False) -> dict[str, np.ndarray]:
    """f32 inputs; the old policy is 0.3 nats away so that both clip sides are hit."""
    rng = np.random.default_rng(seed)
    logps = rng.uniform(-3.0, -0.05, (B, T)).astype(np.float32)
    adv_shape = (B, T) if token_advantages else (B,)
    return {
        "logps": logps,
        "old_logps": (logps + rng.normal(0, 0.3, (B, T))).astype(np.float32),
        "ref_logps": (logps + rng.normal(0, 0.5, (B, T))).astype(np.float32),
        "engine_logps": (logps + rng.normal(0, 0.4, (B, T))).astype(np.float32),
        "advantages": rng.normal(size=adv_shape).astype(np.float32),
        "mask": MASK,
    }


def ours(batch, cfg, normalizer=None, **kw):
    return policy_gradient_loss(
        jnp.asarray(batch["logps"]),
        jnp.asarray(batch["old_logps"]),
        jnp.asarray(batch["advantages"]),
        jnp.asarray(batch["mask"]),
        ref_logps=jnp.asarray(batch["ref_logps"]),
        engine_logps=jnp.asarray(batch["engine_logps"]),
        cfg=cfg,
        normalizer=normalizer,
        **kw,
    )


TRL_CASES = [
    dict(loss_agg=agg, importance_sampling_level=level, beta=beta)
    for agg, level, beta in itertools.product(
        ("grpo", "bnpo", "dapo", "dr_grpo"), ("token", "sequence"), (0.0, 0.04)
    )
] + [
    dict(loss_agg="dapo", epsilon_high=0.28),  # DAPO clip-higher
    dict(loss_agg="grpo", delta=1.25, beta=0.04),  # INTELLECT-2 two-sided clip
    dict(loss_agg="dapo", tis_cap=2.0),  # truncated importance sampling
    dict(loss_agg="dr_grpo", tis_cap=1.5, importance_sampling_level="sequence", beta=0.01),
]


@pytest.mark.parametrize("token_advantages", [False, True])
@pytest.mark.parametrize("options", TRL_CASES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_matches_trl(options, token_advantages):
    batch = make_batch(seed=len(str(options)), token_advantages=token_advantages)
    cfg = PolicyLossConfig(max_completion_length=T, **options)
    loss, metrics = ours(batch, cfg)
    is_ratio = None
    if cfg.tis_cap is not None:
        is_ratio = vllm_is_token_truncate(
            batch["old_logps"], batch["engine_logps"], batch["mask"], cfg.tis_cap
        )
    want, want_metrics = grpo_compute_loss(
        batch["logps"],
        batch["old_logps"],
        batch["advantages"],
        batch["mask"],
        ref_per_token_logps=batch["ref_logps"],
        beta=cfg.beta,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high,
        delta=cfg.delta,
        importance_sampling_level=cfg.importance_sampling_level,
        loss_type=cfg.loss_agg,
        max_completion_length=T,
        importance_sampling_ratio=is_ratio,
    )
    close(loss, want)
    close(metrics["clip_fraction/low"], want_metrics["clip_ratio/low_mean"])
    close(metrics["clip_fraction/high"], want_metrics["clip_ratio/high_mean"])
    close(metrics["clip_fraction"], want_metrics["clip_ratio/region_mean"])
    if cfg.beta:
        close(metrics["kl"], want_metrics["kl"])
    # The random batch really exercises clipping.
    if cfg.importance_sampling_level == "token":
        assert float(metrics["clip_fraction"]) > 0


@pytest.mark.parametrize("agg", POLICY_AGGS)
def test_on_policy_gradient_is_minus_advantage_over_denominator(agg):
    """old = stop_gradient(logps): rho = 1, l_t = -A rho_t, so dL/dlp_t = -A m_t / D_t with
    D_t = B * n_i (grpo), sum(m) (bnpo, dapo), B * L (dr_grpo), B (seq_sum)."""
    batch = make_batch(seed=5)
    cfg = PolicyLossConfig(loss_agg=agg, max_completion_length=T)
    adv = jnp.asarray(batch["advantages"])
    mask = jnp.asarray(MASK)

    def loss_of(lp):
        return policy_gradient_loss(lp, jax.lax.stop_gradient(lp), adv, mask, cfg=cfg)[0]

    grad = np.asarray(jax.grad(loss_of)(jnp.asarray(batch["logps"])))
    lengths = np.maximum(LENGTHS, 1)[:, None].astype(np.float64)
    denominator = {
        "grpo": B * lengths,
        "bnpo": MASK.sum(),
        "dapo": MASK.sum(),
        "dr_grpo": B * T,
        "seq_sum": B,
    }[agg]
    want = -batch["advantages"][:, None].astype(np.float64) * MASK / denominator
    close(grad, want, atol=1e-7)
    # and the loss itself is sum_t -A m / D_t (rho = 1, no clipping on-policy)
    close(loss_of(jnp.asarray(batch["logps"])), want.sum())


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("agg", POLICY_AGGS)
def test_micro_batches_sum_to_full_batch(agg, level):
    """8 micro-batches of 1 row and 2 of 4, each divided by the whole batch's denominator:
    their losses and gradients add up to the full batch's."""
    batch = make_batch(seed=13)
    cfg = PolicyLossConfig(
        loss_agg=agg,
        importance_sampling_level=level,
        max_completion_length=T,
        beta=0.04,
        epsilon_high=0.28,
    )

    def loss_of(lp, rows, normalizer):
        part = {k: v[rows] for k, v in batch.items()}
        return ours({**part, "logps": lp}, cfg, normalizer)[0]

    full_rows = np.arange(B)
    full_loss, full_grad = jax.value_and_grad(loss_of)(batch["logps"], full_rows, None)
    denominator = loss_denominator(jnp.asarray(MASK), agg, max_completion_length=T)
    for split in ([1] * 8, [4, 4]):
        total, grads = 0.0, []
        for rows in np.split(full_rows, np.cumsum(split)[:-1]):
            micro_loss, micro_grad = jax.value_and_grad(loss_of)(
                batch["logps"][rows], rows, denominator
            )
            total += float(micro_loss)
            grads.append(np.asarray(micro_grad))
        close(total, float(full_loss))
        close(np.concatenate(grads), np.asarray(full_grad), atol=1e-7)


def test_bnpo_with_normalizer_is_dapo():
    batch = make_batch(seed=17)
    denominator = loss_denominator(jnp.asarray(MASK), "bnpo")
    half = {k: v[:4] for k, v in batch.items()}
    bnpo, _ = ours(half, PolicyLossConfig(loss_agg="bnpo"), denominator)
    dapo, _ = ours(half, PolicyLossConfig(loss_agg="dapo"), denominator)
    local, _ = ours(half, PolicyLossConfig(loss_agg="bnpo"))
    assert float(bnpo) == float(dapo)
    assert float(bnpo) != pytest.approx(float(local))  # local bnpo divides by its own tokens


def test_jit_with_traced_normalizer():
    batch = make_batch(seed=19)
    cfg = DEEPSEEKMATH_GRPO
    fn = jax.jit(functools.partial(policy_gradient_loss, cfg=cfg))
    args = [jnp.asarray(batch[k]) for k in ("logps", "old_logps", "advantages", "mask")]
    normalizer = loss_denominator(args[3], cfg.loss_agg)
    loss, metrics = fn(*args, ref_logps=jnp.asarray(batch["ref_logps"]), normalizer=normalizer)
    eager, _ = ours(batch, cfg, normalizer)
    close(loss, float(eager))
    assert all(v.shape == () and v.dtype == jnp.float32 for v in metrics.values())


def test_metrics_are_flat_f32_scalars():
    batch = make_batch(seed=23)
    cfg = PolicyLossConfig(dual_clip=3.0, tis_cap=2.0, beta=0.04)
    entropy = jnp.full((B, T), 0.7)
    loss, metrics = ours(batch, cfg, entropy=entropy)
    assert loss.shape == () and loss.dtype == jnp.float32
    for name in (
        "clip_fraction",
        "clip_fraction/low",
        "clip_fraction/high",
        "clip_fraction/dual",
        "kl",
        "ratio/mean",
        "ratio/max",
        "is_weight/mean",
        "engine_logp_gap",
        "entropy",
    ):
        assert metrics[name].shape == () and metrics[name].dtype == jnp.float32, name
    assert float(metrics["entropy"]) == pytest.approx(0.7)
    assert float(metrics["ratio/max"]) >= float(metrics["ratio/mean"]) > 0


def test_kl_estimators():
    rng = np.random.default_rng(0)
    lp = rng.uniform(-4, 0, (3, 5)).astype(np.float32)
    rlp = rng.uniform(-4, 0, (3, 5)).astype(np.float32)
    d = lp.astype(np.float64) - rlp
    close(kl_estimate(lp, rlp, "k1"), d)
    close(kl_estimate(lp, rlp, "k2"), 0.5 * d**2)
    k3 = np.exp(-d) + d - 1
    close(kl_estimate(lp, rlp, "k3"), k3, rtol=1e-5)
    assert np.all(np.asarray(kl_estimate(lp, rlp, "k3")) >= 0)
    close(kl_estimate(lp, rlp, "k3", clamp=0.5), np.clip(k3, -0.5, 0.5), rtol=1e-5)
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate(lp, rlp, "k4")


def test_presets():
    # TRL GRPOConfig (checked in trl/trainer/grpo_config.py): beta 0.0, epsilon 0.2 both
    # sides, loss_type 'dapo', token-level ratio, no delta; its KL is k3.
    assert (TRL_GRPO.beta, TRL_GRPO.epsilon_low, TRL_GRPO.epsilon_high) == (0.0, 0.2, 0.2)
    assert (TRL_GRPO.loss_agg, TRL_GRPO.kl_estimator) == ("dapo", "k3")
    assert TRL_GRPO.importance_sampling_level == "token" and TRL_GRPO.delta is None
    assert (DEEPSEEKMATH_GRPO.loss_agg, DEEPSEEKMATH_GRPO.beta) == ("grpo", 0.04)
    assert DEEPSEEKMATH_GRPO.kl_estimator == "k3" and DEEPSEEKMATH_GRPO.epsilon_high == 0.2
    assert (DAPO.epsilon_low, DAPO.epsilon_high, DAPO.loss_agg, DAPO.beta) == (
        0.2,
        0.28,
        "dapo",
        0.0,
    )
    assert (DR_GRPO.loss_agg, DR_GRPO.beta) == ("dr_grpo", 0.0)
    batch = make_batch(seed=29)
    with pytest.raises(ValueError, match="max_completion_length"):
        ours(batch, DR_GRPO)
    loss, _ = ours(batch, dataclasses.replace(DR_GRPO, max_completion_length=T))
    assert np.isfinite(float(loss))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(epsilon_low=1.0), "epsilon_low"),
        (dict(epsilon_high=-0.1), "epsilon_high"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(delta=0.9), "delta"),
        (dict(importance_sampling_level="segment"), "importance_sampling_level"),
        (dict(loss_agg="mean"), "aggregation"),
        (dict(loss_agg="seq_mean"), "not a policy-gradient"),
        (dict(kl_estimator="k5"), "kl_estimator"),
        (dict(tis_cap=0.0), "tis_cap"),
        (dict(beta=-1.0), "beta"),
    ],
)
def test_bad_config_raises(options, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**options)


def test_bad_inputs_raise():
    batch = make_batch(seed=31)
    lp, olp, adv, mask = (
        jnp.asarray(batch[k]) for k in ("logps", "old_logps", "advantages", "mask")
    )
    cfg = PolicyLossConfig()
    with pytest.raises(ValueError, match="old_logps"):
        policy_gradient_loss(lp, olp[:, :5], adv, mask, cfg=cfg)
    with pytest.raises(ValueError, match="advantages"):
        policy_gradient_loss(lp, olp, adv[:3], mask, cfg=cfg)
    with pytest.raises(ValueError, match="ref_logps"):
        policy_gradient_loss(lp, olp, adv, mask, cfg=PolicyLossConfig(beta=0.1))
    with pytest.raises(ValueError, match="engine_logps"):
        policy_gradient_loss(lp, olp, adv, mask, cfg=PolicyLossConfig(tis_cap=2.0))
    with pytest.raises(ValueError, match="aggregation"):
        loss_denominator(mask, "tokens")


def test_registry():
    assert get_loss("grpo") is policy_gradient_loss
    assert {
        "grpo",
        "ppo_policy",
        "ppo_value",
        "dpo",
        "simpo",
        "orpo",
        "bradley_terry",
        "sft",
    } <= set(registry.names("loss"))
    with pytest.raises(ValueError, match="known losses: .*'dpo'.*'grpo'"):
        get_loss("gpro")
