"""Every trainer, end to end on a tiny model: it trains every parameter, stops on NaN, and
writes what `tandem serve` loads."""

from __future__ import annotations

import json

import gin
import jax
import numpy as np
import pytest
from flax import nnx

from tandem.align.algo_configs import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig
from tandem.align.data import synthetic_arithmetic, synthetic_preferences
from tandem.align.train_config import TrainConfig
from tandem.align.trainer import TrainingDiverged
from tandem.configs import parse

TINY = (
    "ModelConfig.num_layers = 1",
    "ModelConfig.hidden_size = 32",
    "ModelConfig.intermediate_size = 64",
    "ModelConfig.max_position_embeddings = 64",
)


def length_reward(prompts, completions, **_):
    """Varies within a group, so group-normalised advantages are not all zero."""
    return [float(len(c)) for c in completions]


@pytest.fixture(autouse=True)
def tiny_model_config():
    gin.clear_config()
    parse(["models/tiny.gin"], TINY)
    yield
    gin.clear_config()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {
        "arithmetic": write_jsonl(d / "arith.jsonl", synthetic_arithmetic(64, seed=0)),
        "preferences": write_jsonl(d / "prefs.jsonl", synthetic_preferences(64, seed=0)),
    }


def initial_params(cfg: TrainConfig):
    """The params a run starts from (the policy is rebuilt from the same seed)."""
    from tandem.align.policy import load_policy

    model, _ = load_policy(cfg)
    return jax.device_get(nnx.state(model))


def assert_all_changed(before, after, skip=()):
    flat_before = dict(nnx.to_flat_state(before))
    flat_after = dict(nnx.to_flat_state(after))
    unchanged = [
        "/".join(map(str, path))
        for path, v in flat_before.items()
        if not any(s in path for s in skip) and np.array_equal(v[...], flat_after[path][...])
    ]
    assert not unchanged, f"parameters that did not change: {unchanged}"


def run_cfg(tmp_path, train_file, **kw):
    base = dict(
        run_dir=str(tmp_path / "run"),
        train_file=train_file,
        num_steps=2,
        batch_size=8,
        max_length=16,
        learning_rate=1e-2,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


def test_sft_changes_every_parameter_and_exports_hf(tmp_path, files):
    from tandem.align.sft import train_sft
    from tandem.serve.llm import LLM

    cfg = run_cfg(tmp_path, files["arithmetic"])
    before = initial_params(cfg)
    result = train_sft(cfg, SFTConfig(packing=True))
    assert_all_changed(before, nnx.state(result.module))
    assert np.isfinite(result.last_metrics["loss"])
    # The exported checkpoint serves with the trained weights.
    llm = LLM(str(tmp_path / "run" / "hf"))
    trained = dict(nnx.to_flat_state(nnx.state(result.module)))
    served = dict(nnx.to_flat_state(llm.engine.params))
    for path, v in trained.items():
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(served[path][...]))


def test_dpo_and_reward_model_change_every_parameter(tmp_path, files):
    from tandem.align.dpo import train_dpo
    from tandem.align.reward_model import load_reward_model
    from tandem.align.reward_trainer import train_reward_model

    cfg = run_cfg(tmp_path / "dpo", files["preferences"])
    before = initial_params(cfg)
    result = train_dpo(cfg, DPOConfig())
    assert_all_changed(before, nnx.state(result.module))

    cfg = run_cfg(tmp_path / "rm", files["preferences"])
    before = initial_params(cfg)
    result = train_reward_model(cfg, RewardConfig())
    # The trunk drops the LM head (nothing trains it); everything else changes.
    assert_all_changed(before, nnx.state(result.module.trunk), skip=("lm_head",))
    rm_dir = str(tmp_path / "rm" / "run" / "hf")
    # Saved as TRL saves a reward model (tests/align/test_reward_model_hf.py: parity).
    config = json.loads((tmp_path / "rm" / "run" / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    saved = load_reward_model(rm_dir)
    np.testing.assert_array_equal(
        np.asarray(saved.score[...]), np.asarray(result.module.score[...])
    )

    # The saved reward model is a reward function: GRPO scores its rollouts with it.
    from tandem.align.rl.grpo import train_grpo

    cfg = run_cfg(tmp_path / "grpo_rm", files["arithmetic"], num_steps=1, max_length=32)
    rl = GRPOConfig(group_size=4, max_prompt_length=8, max_completion_length=4, reward_model=rm_dir)
    metrics = train_grpo(cfg, rl).last_metrics
    assert np.isfinite(metrics["rewards/reward_model"])
    assert metrics["reward/std"] > 0  # a learned score, not a constant


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_preference_losses_train_from_the_dpo_config(tmp_path, files, loss):
    """SimPO and ORPO are the DPO trainer with one binding changed on the command line:
    `tandem train dpo --gin_file train/dpo_tiny.gin --gin_param DPOConfig.loss='simpo'`."""
    from tandem.align.metrics_log import read_metrics
    from tandem.cli.main import main
    from tandem.model.hf import load_model

    run_dir = tmp_path / "run"
    bindings = (
        *TINY,
        f"TrainConfig.train_file = '{files['preferences']}'",
        f"TrainConfig.run_dir = '{run_dir}'",
        "TrainConfig.num_steps = 2",
        "TrainConfig.batch_size = 8",
        "TrainConfig.max_length = 16",
        "TrainConfig.learning_rate = 1e-2",
        "TrainConfig.progress = False",
        f"DPOConfig.loss = '{loss}'",
    )
    argv = ["train", "dpo", "--gin_file", "train/dpo_tiny.gin"]
    for binding in bindings:
        argv += ["--gin_param", binding]
    gin.clear_config()  # a fresh process, as the command line has
    assert main(argv) == 0
    # The run's config is still bound: rebuild the policy it started from, and compare the
    # exported checkpoint (the trained weights, saved in f32) with it.
    before = initial_params(TrainConfig())
    assert_all_changed(before, nnx.state(load_model(str(run_dir / "hf"))))
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert last["step"] == 2
    for key in ("loss", "grad_norm", "rewards/margin", "rewards/accuracy"):
        assert np.isfinite(last[key]), key
    # No frozen reference is built or run for either loss.
    assert "time/reference" not in last
    if loss == "orpo":
        assert last["nll"] > 0


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_rl_trainers_change_every_parameter(tmp_path, files, algorithm):
    reward = f"{__name__}:length_reward"
    cfg = run_cfg(tmp_path, files["arithmetic"], max_length=32)
    before = initial_params(cfg)
    if algorithm == "grpo":
        from tandem.align.rl.grpo import train_grpo

        # With the KL term (so the reference pass runs), DAPO's dynamic sampling and its
        # soft overlong punishment over the last 2 tokens.
        rl_cfg = GRPOConfig(
            group_size=4,
            max_prompt_length=8,
            max_completion_length=6,
            reward_funcs=(reward,),
            beta=0.04,
            dynamic_sampling=True,
            overlong_cache_length=2,
        )
        result = train_grpo(cfg, rl_cfg)
        policy = nnx.state(result.module)
    else:
        from tandem.align.rl.ppo import train_ppo

        rl_cfg = PPOConfig(
            max_prompt_length=8, max_completion_length=6, reward_funcs=(reward,), num_ppo_epochs=2
        )
        result = train_ppo(cfg, rl_cfg)
        policy = nnx.state(result.module.policy)
        for head in ("value_head", "value_bias"):
            assert np.any(np.asarray(getattr(result.module, head)[...]) != 0)
    assert_all_changed(before, policy)
    m = result.last_metrics
    for key in ("reward/mean", "reward/std", "logp_mismatch/max", "completion_length/mean"):
        assert np.isfinite(m[key]), key
    for key in ("rollout", "logprobs", "reference", "update", "handoff"):
        assert m[f"time/{key}"] >= 0
    if algorithm == "grpo":
        assert m["dynamic_sampling/tries"] >= 1
        assert "reward/overlong_penalty" in m
    # The engine sampled with the params the trainer had: logprobs agree (f32, CPU).
    assert m["logp_mismatch/max"] < 1e-3


def test_nan_loss_stops_the_run_with_its_step(tmp_path, files):
    from tandem.align.sft import train_sft

    cfg = run_cfg(tmp_path, files["arithmetic"], num_steps=5, learning_rate=1e30)
    with pytest.raises(TrainingDiverged, match=r"step [0-9]+: (loss|grad_norm) is (nan|inf)"):
        train_sft(cfg, SFTConfig())
