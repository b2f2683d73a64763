"""DPO (every loss_type), cDPO, SimPO, ORPO, Bradley-Terry and SFT against TRL transcriptions,
the ln 2 invariant and the accumulation contract of the pair and token losses."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trl_reference import (
    cdpo_loss,
    dpo_loss,
    get_batch_logps,
    orpo_loss,
    reward_loss,
    simpo_loss,
)
from trl_reference import sft_loss as trl_sft_loss

from tandem.align.logprobs import average_logps, sequence_logps
from tandem.align.losses import get_loss, loss_denominator

B, T = 8, 12
CHOSEN_LENGTHS = np.array([12, 4, 7, 1, 9, 3, 10, 6])
REJECTED_LENGTHS = np.array([5, 12, 2, 8, 6, 11, 1, 7])


def close(actual, expected, rtol=2e-6, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def lengths_mask(lengths):
    return (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)  # [B, T]


def token_batch(seed):
    """Per-token f32 logps for chosen/rejected under policy and reference."""
    rng = np.random.default_rng(seed)
    out = {k: rng.uniform(-2.5, -0.05, (B, T)).astype(np.float32) for k in ("w", "l")}
    out["ref_w"] = (out["w"] + rng.normal(0, 0.2, (B, T))).astype(np.float32)
    out["ref_l"] = (out["l"] + rng.normal(0, 0.2, (B, T))).astype(np.float32)
    out["mask_w"], out["mask_l"] = lengths_mask(CHOSEN_LENGTHS), lengths_mask(REJECTED_LENGTHS)
    return out


def summed(tb):
    """The [B] summed logps DPO takes, computed the way TRL does (get_batch_logps)."""
    return {
        "chosen_logps": sequence_logps(tb["w"], tb["mask_w"]),
        "rejected_logps": sequence_logps(tb["l"], tb["mask_l"]),
        "ref_chosen_logps": sequence_logps(tb["ref_w"], tb["mask_w"]),
        "ref_rejected_logps": sequence_logps(tb["ref_l"], tb["mask_l"]),
    }


def trl_summed(tb):
    return (
        get_batch_logps(tb["w"], tb["mask_w"], False),
        get_batch_logps(tb["l"], tb["mask_l"], False),
        get_batch_logps(tb["ref_w"], tb["mask_w"], False),
        get_batch_logps(tb["ref_l"], tb["mask_l"], False),
    )


@pytest.mark.parametrize(
    "loss_type, label_smoothing",
    [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1), ("robust", 0.3)],
)
def test_dpo_matches_trl(loss_type, label_smoothing):
    tb = token_batch(seed=1)
    close(summed(tb)["chosen_logps"], trl_summed(tb)[0])
    loss, metrics = get_loss("dpo")(
        **summed(tb),
        beta=0.1,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=jnp.asarray(CHOSEN_LENGTHS),
        rejected_lengths=jnp.asarray(REJECTED_LENGTHS),
    )
    want, chosen_rewards, rejected_rewards = dpo_loss(
        *trl_summed(tb),
        beta=0.1,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_mask=tb["mask_w"],
        rejected_mask=tb["mask_l"],
    )
    close(loss, want)
    close(metrics["rewards/chosen"], chosen_rewards.mean())
    close(metrics["rewards/rejected"], rejected_rewards.mean())
    close(metrics["rewards/accuracy"], (chosen_rewards > rejected_rewards).mean())
    close(metrics["rewards/margin"], (chosen_rewards - rejected_rewards).mean())


def test_cdpo_label_smoothing():
    tb = token_batch(seed=2)
    loss, _ = get_loss("dpo")(**summed(tb), beta=0.2, label_smoothing=0.15)
    close(loss, cdpo_loss(*trl_summed(tb), beta=0.2, eps=0.15))


def test_dpo_at_reference_is_ln2():
    tb = token_batch(seed=3)
    s = summed(tb)
    loss, metrics = get_loss("dpo")(
        s["chosen_logps"], s["rejected_logps"], s["chosen_logps"], s["rejected_logps"]
    )
    assert float(loss) == pytest.approx(math.log(2.0), abs=1e-7)
    assert float(metrics["rewards/margin"]) == 0.0


def test_dpo_gradient_raises_chosen_lowers_rejected():
    tb = token_batch(seed=4)
    s = summed(tb)

    def loss_of(chosen, rejected):
        return get_loss("dpo")(chosen, rejected, s["ref_chosen_logps"], s["ref_rejected_logps"])[0]

    g_w, g_l = jax.grad(loss_of, argnums=(0, 1))(s["chosen_logps"], s["rejected_logps"])
    assert np.all(np.asarray(g_w) < 0) and np.all(np.asarray(g_l) > 0)


def test_simpo_matches_trl():
    tb = token_batch(seed=5)
    a_w, a_l = average_logps(tb["w"], tb["mask_w"]), average_logps(tb["l"], tb["mask_l"])
    close(a_w, get_batch_logps(tb["w"], tb["mask_w"], True))
    for label_smoothing in (0.0, 0.1):
        loss, metrics = get_loss("simpo")(
            a_w, a_l, beta=2.0, gamma=0.5, label_smoothing=label_smoothing
        )
        want, chosen_rewards, rejected_rewards = simpo_loss(
            a_w, a_l, beta=2.0, simpo_gamma=0.5, label_smoothing=label_smoothing
        )
        close(loss, want)
        close(metrics["rewards/margin"], (chosen_rewards - rejected_rewards).mean())


def test_orpo_matches_trl():
    tb = token_batch(seed=6)
    args = (tb["w"], tb["mask_w"], tb["l"], tb["mask_l"])
    loss, metrics = get_loss("orpo")(*(jnp.asarray(x) for x in args), beta=0.1)
    want, nll, ratio_mean, log_odds_mean = orpo_loss(*args, beta=0.1)
    close(loss, want)
    close(metrics["nll"], nll)
    close(metrics["log_odds_ratio"], ratio_mean)
    close(metrics["log_odds"], log_odds_mean, rtol=1e-5)


@pytest.mark.parametrize("margin", [None, 0.5])
@pytest.mark.parametrize("center", [None, 0.01])
def test_bradley_terry_matches_trl(margin, center):
    rng = np.random.default_rng(7)
    r_w, r_l = rng.normal(size=(2, B)).astype(np.float32)
    margins = None if margin is None else np.full(B, margin, np.float32)
    loss, metrics = get_loss("bradley_terry")(
        jnp.asarray(r_w),
        jnp.asarray(r_l),
        margin=None if margins is None else jnp.asarray(margins),
        center_rewards_coefficient=center,
    )
    close(loss, reward_loss(r_w, r_l, margins, center))
    close(metrics["rewards/accuracy"], (r_w > r_l).mean())


def test_sft_matches_trl():
    tb = token_batch(seed=8)
    loss, metrics = get_loss("sft")(jnp.asarray(tb["w"]), jnp.asarray(tb["mask_w"]))
    close(loss, trl_sft_loss(tb["w"], tb["mask_w"]))
    assert float(metrics["num_tokens"]) == CHOSEN_LENGTHS.sum()


def _pair_losses(tb):
    """name -> (fn(rows, normalizer) -> loss, aggregation of its normalizer)."""
    s = {k: np.asarray(v) for k, v in summed(tb).items()}
    a_w = np.asarray(average_logps(tb["w"], tb["mask_w"]))
    a_l = np.asarray(average_logps(tb["l"], tb["mask_l"]))
    lengths = {"chosen_lengths": CHOSEN_LENGTHS, "rejected_lengths": REJECTED_LENGTHS}

    def dpo(loss_type):
        def run(rows, normalizer):
            kw = {k: jnp.asarray(v[rows]) for k, v in {**s, **lengths}.items()}
            return get_loss("dpo")(**kw, loss_type=loss_type, normalizer=normalizer)[0]

        return run

    return {
        "dpo-sigmoid": dpo("sigmoid"),
        "dpo-ipo": dpo("ipo"),
        "dpo-robust": dpo("robust"),
        "simpo": lambda rows, n: get_loss("simpo")(a_w[rows], a_l[rows], normalizer=n)[0],
        "bradley_terry": lambda rows, n: get_loss("bradley_terry")(
            a_w[rows], a_l[rows], center_rewards_coefficient=0.01, normalizer=n
        )[0],
    }


@pytest.mark.parametrize("split", [[1] * 8, [4, 4]], ids=["8x1", "2x4"])
def test_pair_losses_micro_batches_sum_to_full_batch(split):
    tb = token_batch(seed=9)
    pairs = jnp.ones(B)
    normalizer = loss_denominator(pairs, "seq_mean")
    chunks = np.split(np.arange(B), np.cumsum(split)[:-1])
    for run in _pair_losses(tb).values():
        full = float(run(np.arange(B), None))
        total = sum(float(run(rows, normalizer)) for rows in chunks)
        close(total, full, atol=2e-6)


@pytest.mark.parametrize("split", [[1] * 8, [4, 4]], ids=["8x1", "2x4"])
def test_token_losses_micro_batches_sum_to_full_batch(split):
    """SFT (token_mean) and ORPO (pairs + chosen tokens): losses and gradients add up."""
    tb = token_batch(seed=10)
    chunks = np.split(np.arange(B), np.cumsum(split)[:-1])
    tokens = loss_denominator(jnp.asarray(tb["mask_w"]), "token_mean")
    pairs = loss_denominator(jnp.asarray(tb["mask_w"]), "seq_mean")

    def sft(lp, rows, normalizer, _):
        return get_loss("sft")(lp, jnp.asarray(tb["mask_w"][rows]), normalizer=normalizer)[0]

    def orpo(lp, rows, normalizer, nll_normalizer):
        return get_loss("orpo")(
            lp,
            jnp.asarray(tb["mask_w"][rows]),
            jnp.asarray(tb["l"][rows]),
            jnp.asarray(tb["mask_l"][rows]),
            normalizer=normalizer,
            nll_normalizer=nll_normalizer,
        )[0]

    for fn, normalizers in ((sft, (tokens, None)), (orpo, (pairs, tokens))):
        full, full_grad = jax.value_and_grad(fn)(jnp.asarray(tb["w"]), np.arange(B), None, None)
        total, grads = 0.0, []
        for rows in chunks:
            micro, grad = jax.value_and_grad(fn)(jnp.asarray(tb["w"][rows]), rows, *normalizers)
            total += float(micro)
            grads.append(np.asarray(grad))
        close(total, float(full))
        close(np.concatenate(grads), np.asarray(full_grad), atol=1e-7)


def test_bad_inputs_raise():
    s = summed(token_batch(seed=11))
    dpo = get_loss("dpo")
    with pytest.raises(ValueError, match="loss_type"):
        dpo(**s, loss_type="kto")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo(**s, loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo(**s, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo(**s, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo(**s, beta=0.0)
    with pytest.raises(ValueError, match="rejected_logps"):
        dpo(s["chosen_logps"], s["rejected_logps"][:3], s["chosen_logps"], s["chosen_logps"])
    with pytest.raises(ValueError, match=r"per-pair \[B\]"):
        get_loss("simpo")(jnp.zeros((B, T)), jnp.zeros((B, T)))
    with pytest.raises(ValueError, match="pair counts"):
        get_loss("orpo")(jnp.zeros((B, T)), jnp.ones((B, T)), jnp.zeros((2, T)), jnp.ones((2, T)))
    with pytest.raises(ValueError, match="must both be"):
        get_loss("sft")(jnp.zeros((B, T)), jnp.ones((B, T + 1)))
