"""GRPO and PPO on a mesh train as they do on one device.

tests/conftest.py gives the process 8 CPU devices and `build_mesh` spans all of them, so
'tensor' 2 comes with data 2 x fsdp 2 (GRPO) or with data 4 (PPO). The policy, and PPO's
value head, are sharded by their logical axes; the rollout engine serves the same arrays
tensor parallel; after every update the new params go to the engine. Same seed, f32: the
engine samples the same tokens, so rewards and lengths match exactly, and losses, gradient
norms and the final params match up to summation order.
"""

from __future__ import annotations

import json

import gin
import jax
import numpy as np
import pytest
from flax import nnx

from tandem.align.algo_configs import GRPOConfig, PPOConfig
from tandem.align.data import synthetic_arithmetic
from tandem.align.metrics_log import read_metrics
from tandem.align.rl import common
from tandem.align.rl.rollout import generate
from tandem.align.train_config import TrainConfig
from tandem.configs import parse

# The tiny preset's 4 q / 2 kv heads split over tensor=2.
TINY = (
    "ModelConfig.num_layers = 1",
    "ModelConfig.hidden_size = 32",
    "ModelConfig.intermediate_size = 64",
    "ModelConfig.max_position_embeddings = 64",
)
REWARD = f"{__name__}:length_reward"
# Sampled tokens are the same; what is computed from them differs by float summation order.
EXACT = ("reward/mean", "reward/std", "completion_length/mean", "completions/eos_fraction")
CLOSE = ("loss", "grad_norm", "entropy", "kl", "approx_kl", "loss/value", "value/value/mean")


def length_reward(prompts, completions, **_):
    """Varies within a group, so group-normalised advantages are not all zero."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_arithmetic(32, seed=0)))
    return str(path)


@pytest.fixture
def engines(monkeypatch):
    """The rollout engines the runs build."""
    built = []
    make_engine = common.make_engine

    def record(*args, **kwargs):
        built.append(make_engine(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(common, "make_engine", record)
    return built


def train(algorithm: str, run_dir, train_file, mesh_shape):
    gin.clear_config()
    parse(["models/tiny.gin"], TINY)
    cfg = TrainConfig(
        run_dir=str(run_dir),
        train_file=train_file,
        num_steps=2,
        batch_size=8,
        max_length=32,
        learning_rate=1e-2,
        # Adam divides by sqrt(v) + eps: a gradient entry at float-noise level (1e-9) would
        # move by the full learning rate, in a direction the summation order decides. This
        # eps damps such entries; real gradients, orders of magnitude larger, take Adam steps.
        adam_eps=1e-4,
        progress=False,
        mesh_shape=mesh_shape,
    )
    try:
        if algorithm == "grpo":
            from tandem.align.rl.grpo import train_grpo

            rl_cfg = GRPOConfig(
                group_size=4, max_prompt_length=8, max_completion_length=6, reward_funcs=(REWARD,)
            )
            result = train_grpo(cfg, rl_cfg)
        else:
            from tandem.align.rl.ppo import train_ppo

            # PPO also runs its frozen reference on the mesh.
            rl_cfg = PPOConfig(
                max_prompt_length=8,
                max_completion_length=6,
                reward_funcs=(REWARD,),
                num_ppo_epochs=2,
                num_mini_batches=2,
            )
            result = train_ppo(cfg, rl_cfg)
    finally:
        gin.clear_config()
    return result, read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.parametrize(
    "algorithm,mesh_shape", [("grpo", (2, -1, 2)), ("ppo", (-1, 1, 2))], ids=["grpo", "ppo"]
)
def test_rl_on_a_mesh_equals_one_device(tmp_path, train_file, engines, algorithm, mesh_shape):
    one, one_metrics = train(algorithm, tmp_path / "one", train_file, (1, 1, 1))
    sharded, metrics = train(algorithm, tmp_path / "mesh", train_file, mesh_shape)
    assert len(metrics) == len(one_metrics) == 2
    for step, (got, want) in enumerate(zip(metrics, one_metrics), start=1):
        for key in EXACT:
            assert got[key] == want[key], (step, key)
        for key in CLOSE:
            if key in want:
                np.testing.assert_allclose(
                    got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=f"step {step}: {key}"
                )
        # The engine sampled with the params the trainer had.
        assert got["logp_mismatch/max"] < 1e-4
    for (path, got), (_, want) in zip(
        jax.tree_util.tree_leaves_with_path(nnx.state(sharded.module)),
        jax.tree_util.tree_leaves_with_path(nnx.state(one.module)),
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=str(path))

    engine = engines[-1]
    mesh = engine.mesh
    assert mesh is not None and mesh.shape["tensor"] == 2 and mesh.size == 8
    # The rollouts ran tensor parallel: heads, FFN and KV pages split over 'tensor'.
    assert any("tensor" in x.sharding.spec for x in jax.tree.leaves(engine.params))
    assert {s.data.shape[2] for s in engine.kv[0].addressable_shards} == {
        engine.kv[0].shape[2] // 2
    }
    if algorithm == "ppo":  # the value head trained on the mesh too
        assert sharded.state.params["value_head"].sharding.mesh == mesh

    # The train step hands back its params with equivalent shardings spelled its own way;
    # handing them to the warm engine must not compile its step again.
    policy = sharded.state.params["policy"] if algorithm == "ppo" else sharded.state.params
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    before = generate(engine, prompts, group_size=2, max_tokens=4, seed=0)
    num_compiles = engine.stats()["num_compiles"]
    engine.update_params(policy)
    after = generate(engine, prompts, group_size=2, max_tokens=4, seed=0)
    assert engine.stats()["num_compiles"] == num_compiles
    assert after.completion_ids == before.completion_ids
