"""The oracle: NumPy float64 transcriptions of TRL's loss code. (veRL's, for the knobs TRL
lacks, sits beside its tests in test_losses_verl.py.)

Each function follows its source line by line, torch ops swapped for NumPy, so a reader can
hold it next to the original. Sources (huggingface/trl):
- trl/trainer/utils.py: selective_log_softmax, entropy_from_logits, masked_mean/var/whiten
- trl/trainer/grpo_trainer.py: _compute_loss, advantage normalisation
- trl/trainer/dpo_trainer.py, cpo_trainer.py (SimPO), orpo_trainer.py, reward_trainer.py
- trl/experimental/ppo/ppo_trainer.py: rewards, GAE, pg and vf losses
- trl/rewards/other_rewards.py: get_soft_overlong_punishment
Not a test module: the tests import it (`from trl_reference import ...`).
"""

from __future__ import annotations

import numpy as np

INVALID_LOGPROB = 1.0


def f64(x):
    return None if x is None else np.asarray(x, np.float64)


def logsigmoid(x):
    return -np.logaddexp(0.0, -x)


# ---------------------------------------------------------------- trl/trainer/utils.py


def log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def selective_log_softmax(logits, index):
    return np.take_along_axis(log_softmax(logits), index[..., None], -1)[..., 0]


def entropy_from_logits(logits):
    logp = log_softmax(logits)
    return -(np.exp(logp) * logp).sum(-1)


def masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    mean = masked_mean(values, mask)
    centered_values = values - mean
    variance = masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) / np.sqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


# ---------------------------------------------------------------- GRPO


def grpo_advantages(rewards, num_generations, scale_rewards="group", eps=1e-4):
    rewards = f64(rewards)
    mean_grouped_rewards = rewards.reshape(-1, num_generations).mean(axis=1)
    mean_grouped_rewards = np.repeat(mean_grouped_rewards, num_generations)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = rewards.reshape(-1, num_generations).std(axis=1, ddof=1)
            std_rewards = np.repeat(std_rewards, num_generations)
        else:
            std_rewards = np.zeros_like(rewards)
    elif scale_rewards == "batch":
        std_rewards = rewards.std(ddof=1) * np.ones_like(rewards) if rewards.size > 1 else 0.0
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + eps)
    return advantages


def vllm_is_token_truncate(old_per_token_logps, sampling_per_token_logps, mask, cap):
    """GRPOTrainer._generate_and_score_completions, vllm_importance_sampling_mode token_truncate."""
    logps_diff = (f64(old_per_token_logps) - f64(sampling_per_token_logps)) * mask
    return np.minimum(np.exp(logps_diff), cap)


def grpo_compute_loss(
    per_token_logps,
    old_per_token_logps,
    advantages,
    completion_mask,
    *,
    ref_per_token_logps=None,
    beta=0.0,
    epsilon_low=0.2,
    epsilon_high=0.2,
    delta=None,
    importance_sampling_level="token",
    loss_type="dapo",
    max_completion_length=None,
    num_items_in_batch=None,
    current_gradient_accumulation_steps=1,
    num_processes=1,
    importance_sampling_ratio=None,
):
    """GRPOTrainer._compute_loss (no liger, no entropy mask, no off-policy mask)."""
    per_token_logps, old_per_token_logps = f64(per_token_logps), f64(old_per_token_logps)
    advantages, mask = f64(advantages), f64(completion_mask)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    if num_items_in_batch is None:
        num_items_in_batch = mask.sum()

    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_importance_weights = (log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)
        log_importance_weights = log_importance_weights[:, None]
    coef_1 = np.exp(log_importance_weights)
    if beta != 0.0:
        ref = f64(ref_per_token_logps)
        per_token_kl = np.exp(ref - per_token_logps) - (ref - per_token_logps) - 1

    coef_2 = np.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = np.minimum(coef_1, delta)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -np.minimum(per_token_loss1, per_token_loss2)

    if importance_sampling_ratio is not None:
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl

    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean()
        loss = loss / current_gradient_accumulation_steps
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / max(mask.sum(), 1.0)
        loss = loss / current_gradient_accumulation_steps
    elif loss_type == "dr_grpo":
        per_token_loss = np.broadcast_to(per_token_loss, mask.shape)
        loss = (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_completion_length)
        loss = loss / current_gradient_accumulation_steps
    elif loss_type == "dapo":
        normalizer = num_items_in_batch / num_processes
        loss = (per_token_loss * mask).sum() / normalizer

    completion_token_count = max(mask.sum(), 1.0)

    def masked_batch_mean(x):
        if x.shape[1] == 1:
            return x.mean()
        return (x * mask).sum() / completion_token_count

    metrics = {}
    if beta != 0.0:
        metrics["kl"] = masked_batch_mean(per_token_kl)
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    is_region_clipped = is_low_clipped | is_high_clipped
    metrics["clip_ratio/low_mean"] = masked_batch_mean(is_low_clipped.astype(np.float64))
    metrics["clip_ratio/high_mean"] = masked_batch_mean(is_high_clipped.astype(np.float64))
    metrics["clip_ratio/region_mean"] = masked_batch_mean(is_region_clipped.astype(np.float64))
    return loss, metrics


# ---------------------------------------------------------------- preference losses


def dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    chosen_mask=None,
    rejected_mask=None,
):
    """DPOTrainer's per-sequence losses and rewards (returns losses.mean(), rewards)."""
    chosen_logps, rejected_logps = f64(chosen_logps), f64(rejected_logps)
    ref_chosen_logps, ref_rejected_logps = f64(ref_chosen_logps), f64(ref_rejected_logps)
    logratios = chosen_logps - rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    logits = logratios - ref_logratios
    chosen_scores = chosen_logps - ref_chosen_logps
    rejected_scores = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        losses = -logsigmoid(beta * logits)
    elif loss_type == "robust":
        losses = (
            -logsigmoid(beta * logits) * (1 - label_smoothing)
            + logsigmoid(-beta * logits) * label_smoothing
        ) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1 - beta * logits)
    elif loss_type == "ipo":
        chosen_avg_score = chosen_scores / np.maximum(f64(chosen_mask).sum(1), 1.0)
        rejected_avg_score = rejected_scores / np.maximum(f64(rejected_mask).sum(1), 1.0)
        ipo_delta = chosen_avg_score - rejected_avg_score
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_scores
    rejected_rewards = beta * rejected_scores
    return losses.mean(), chosen_rewards, rejected_rewards


def cdpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, eps):
    """Conservative DPO as older TRL, Tunix and OpenRLHF write the sigmoid loss."""
    logits = (f64(chosen_logps) - f64(rejected_logps)) - (
        f64(ref_chosen_logps) - f64(ref_rejected_logps)
    )
    losses = -logsigmoid(beta * logits) * (1 - eps) - logsigmoid(-beta * logits) * eps
    return losses.mean()


def simpo_loss(chosen_logps, rejected_logps, *, beta=0.1, simpo_gamma=0.5, label_smoothing=0.0):
    """CPOTrainer.cpo_loss, loss_type='simpo' (cpo_alpha=0), on average logps."""
    chosen_logps, rejected_logps = f64(chosen_logps), f64(rejected_logps)
    pi_logratios = chosen_logps - rejected_logps
    gamma_logratios = simpo_gamma / beta
    logits = pi_logratios - gamma_logratios
    losses = (
        -logsigmoid(beta * logits) * (1 - label_smoothing)
        - logsigmoid(-beta * logits) * label_smoothing
    )
    return losses.mean(), beta * chosen_logps, beta * rejected_logps


def get_batch_logps(per_token_logps, loss_mask, average_log_prob):
    per_token_logps, loss_mask = f64(per_token_logps), f64(loss_mask)
    if average_log_prob:
        return (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)
    return (per_token_logps * loss_mask).sum(-1)


def orpo_loss(chosen_token_logps, chosen_mask, rejected_token_logps, rejected_mask, beta=0.1):
    """ORPOTrainer: policy_nll_loss (CrossEntropyLoss mean over chosen completion tokens)
    minus the mean of beta * logsigmoid(log_odds) on average logps."""
    policy_chosen_logps = get_batch_logps(chosen_token_logps, chosen_mask, True)
    policy_rejected_logps = get_batch_logps(rejected_token_logps, rejected_mask, True)
    chosen_mask = f64(chosen_mask)
    policy_nll_loss = -(f64(chosen_token_logps) * chosen_mask).sum() / chosen_mask.sum()
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        np.log1p(-np.exp(policy_chosen_logps)) - np.log1p(-np.exp(policy_rejected_logps))
    )
    ratio = logsigmoid(log_odds)
    losses = beta * ratio
    loss = policy_nll_loss - losses.mean()
    return loss, policy_nll_loss, ratio.mean(), log_odds.mean()


def reward_loss(rewards_chosen, rewards_rejected, margin=None, center_rewards_coefficient=None):
    """RewardTrainer.compute_loss."""
    rewards_chosen, rewards_rejected = f64(rewards_chosen), f64(rewards_rejected)
    if margin is not None:
        loss = -logsigmoid(rewards_chosen - rewards_rejected - f64(margin)).mean()
    else:
        loss = -logsigmoid(rewards_chosen - rewards_rejected).mean()
    if center_rewards_coefficient is not None:
        loss += center_rewards_coefficient * np.mean((rewards_chosen + rewards_rejected) ** 2)
    return loss


def sft_loss(per_token_logps, mask, num_items_in_batch=None):
    """Causal-LM cross-entropy: sum over label tokens / num_items_in_batch (or their count)."""
    per_token_logps, mask = f64(per_token_logps), f64(mask)
    total = -(per_token_logps * mask).sum()
    return total / (mask.sum() if num_items_in_batch is None else num_items_in_batch)


# ---------------------------------------------------------------- PPO (trl/experimental/ppo)


def ppo_rewards(
    scores,
    logprobs,
    ref_logprobs,
    sequence_lengths,
    contain_eos_token,
    *,
    kl_coef=0.05,
    kl_estimator="k1",
    missing_eos_penalty=None,
):
    """Steps 3-4 of PPOTrainer.train: EOS penalty, padding masks, per-token rewards."""
    scores = f64(scores).copy()
    logprobs, ref_logprobs = f64(logprobs), f64(ref_logprobs)
    batch, length = logprobs.shape
    if missing_eos_penalty is not None:
        scores[~contain_eos_token] -= missing_eos_penalty
    response_idxs = np.tile(np.arange(length), (batch, 1))
    padding_mask = response_idxs > sequence_lengths[:, None]
    logprobs = np.where(padding_mask, INVALID_LOGPROB, logprobs)
    ref_logprobs = np.where(padding_mask, INVALID_LOGPROB, ref_logprobs)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > sequence_lengths_p1[:, None]
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (np.exp(logr) - 1) - logr
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.copy()
    actual_start = np.arange(batch)
    actual_end = np.where(sequence_lengths_p1 < length, sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    return rewards, padding_mask, padding_mask_p1


def ppo_gae(rewards, values, padding_mask_p1, gamma=1.0, lam=0.95):
    """Step 6 of PPOTrainer.train: values zeroed past seq_len + 1, then the backward loop."""
    rewards = f64(rewards)
    values = np.where(padding_mask_p1, 0.0, f64(values))
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = np.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    return advantages, returns


def ppo_losses(
    new_logprobs,
    mb_logprobs,
    mb_advantage,
    vpred,
    mb_values,
    mb_return,
    mask,
    cliprange=0.2,
    cliprange_value=0.2,
):
    """The minibatch loss of PPOTrainer.train (pg_loss, vf_loss, pg_clipfrac, vf_clipfrac)."""
    new_logprobs, mb_logprobs, mb_advantage = f64(new_logprobs), f64(mb_logprobs), f64(mb_advantage)
    vpred, mb_values, mb_return, mask = f64(vpred), f64(mb_values), f64(mb_return), f64(mask)
    vpredclipped = np.clip(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = np.square(vpred - mb_return)
    vf_losses2 = np.square(vpredclipped - mb_return)
    vf_loss_max = np.maximum(vf_losses1, vf_losses2)
    vf_loss = 0.5 * masked_mean(vf_loss_max, mask)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).astype(np.float64), mask)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = np.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * np.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = np.maximum(pg_losses, pg_losses2)
    pg_loss = masked_mean(pg_loss_max, mask)
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).astype(np.float64), mask)
    return pg_loss, vf_loss, pg_clipfrac, vf_clipfrac


# ---------------------------------------------------------------- trl/rewards/other_rewards.py


def soft_overlong_punishment(completion_lengths, max_completion_len, soft_punish_cache):
    rewards = []
    for completion_length in completion_lengths:
        if completion_length <= max_completion_len - soft_punish_cache:
            rewards.append(0.0)
        elif max_completion_len - soft_punish_cache < completion_length <= max_completion_len:
            rewards.append(
                (max_completion_len - soft_punish_cache - completion_length) / soft_punish_cache
            )
        else:
            rewards.append(-1.0)
    return np.array(rewards)
