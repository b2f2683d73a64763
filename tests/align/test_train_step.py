"""Invariants of the shared train step: accumulation, sharding and packing change where and
in what order arithmetic happens, not what one optimizer step computes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tandem.align.algo_configs import DPOConfig
from tandem.align.dpo import DPO
from tandem.align.policy import frozen_copy
from tandem.align.sft import SFT
from tandem.align.train_step import init_state, make_train_step
from tandem.model import ModelConfig, Transformer
from tandem.model.sharding import make_mesh, state_shardings

CFG = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    model_type="qwen2",
)
B, T = 8, 16


def sft_batch(seed=0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    # Ragged completions: row i predicts its last 3 + i % 5 tokens.
    mask = np.zeros((B, T), np.float32)
    for i in range(B):
        mask[i, T - 3 - i % 5 :] = 1.0
    return {"tokens": tokens, "loss_mask": mask}


# SGD: the new params are params - lr * grads, so comparing them compares gradients
# (Adam's m / sqrt(v) would turn 1e-9 float noise in tiny gradients into sign flips).
OPTIMIZER = optax.sgd(0.5)
SFT_ALGO = SFT()


@functools.cache
def train_step(graphdef, algo, grad_accum):
    """One jitted step per (model, algorithm, accumulation): the tests that take the same
    step (the 1-batch SFT reference) share its compilation."""
    return make_train_step(
        graphdef, algo.loss, algo.denominator, OPTIMIZER, grad_accum_steps=grad_accum
    )


def one_step(model, algo, batch, *, grad_accum=1, mesh=None):
    graphdef, params = nnx.split(model)
    params = jax.tree.map(jnp.copy, params)
    if mesh is not None:
        params = jax.device_put(params, state_shardings(params, mesh))
    state = init_state(params, OPTIMIZER, seed=0)
    step = train_step(graphdef, algo, grad_accum)
    if mesh is not None:
        with jax.set_mesh(mesh):
            state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    else:
        state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    return jax.device_get(state.params), jax.device_get(metrics)


def assert_params_close(a, b, atol=2e-6):
    for (path, x), (_, y) in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, err_msg=str(path))


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("grad_accum", [2, 8])
def test_accumulated_micro_batches_equal_one_batch(model, grad_accum):
    # Rows carry different numbers of completion tokens, so a per-micro-batch mean would
    # weight them differently; the whole-batch normalizer makes the sums agree.
    batch = sft_batch()
    ref_params, ref_metrics = one_step(model, SFT_ALGO, batch)
    params, metrics = one_step(model, SFT_ALGO, batch, grad_accum=grad_accum)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    assert_params_close(params, ref_params)


def test_dpo_accumulation_and_step_zero_loss(model):
    rng = np.random.default_rng(1)
    chosen = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    rejected = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    mask = np.zeros((B, T), np.float32)
    mask[:, T // 2 :] = 1.0
    algo = DPO(DPOConfig(), frozen_copy(model))
    batch, _ = algo.prepare(
        None,
        iter(
            [
                {
                    "chosen_tokens": chosen,
                    "chosen_mask": mask,
                    "rejected_tokens": rejected,
                    "rejected_mask": mask,
                }
            ]
        ),
        0,
    )
    params_1, m1 = one_step(model, algo, batch)
    params_8, m8 = one_step(model, algo, batch, grad_accum=8)
    # Policy == reference at step 0: -log sigmoid(0) = ln 2 exactly.
    np.testing.assert_allclose(m1["loss"], np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(m8["loss"], np.log(2.0), rtol=1e-6)
    assert_params_close(params_8, params_1)


def test_sharded_step_equals_single_device(model):
    batch = sft_batch(2)
    ref_params, ref_metrics = one_step(model, SFT_ALGO, batch)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    params, metrics = one_step(model, SFT_ALGO, batch, grad_accum=2, mesh=mesh)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    assert_params_close(params, ref_params, atol=1e-5)


def test_packed_rows_compute_the_unpacked_loss(model):
    """Two examples packed into one row (segment ids, restarted positions) give the loss
    and gradients of the same two examples in separate rows."""
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in (7, 9))
    unpacked = {
        "tokens": np.zeros((2, 16), np.int32),
        "loss_mask": np.zeros((2, 16), np.float32),
    }
    unpacked["tokens"][0, :7], unpacked["tokens"][1, :9] = a, b
    unpacked["loss_mask"][0, 3:7] = 1.0
    unpacked["loss_mask"][1, 2:9] = 1.0
    packed = {
        "tokens": np.concatenate([a, b])[None],
        "loss_mask": np.concatenate([unpacked["loss_mask"][0, :7], unpacked["loss_mask"][1, :9]])[
            None
        ],
        "segment_ids": np.array([[1] * 7 + [2] * 9], np.int32),
        "positions": np.array([list(range(7)) + list(range(9))], np.int32),
    }
    p_unpacked, m_unpacked = one_step(model, SFT_ALGO, unpacked)
    p_packed, m_packed = one_step(model, SFT_ALGO, packed)
    np.testing.assert_allclose(m_packed["loss"], m_unpacked["loss"], rtol=1e-5)
    assert_params_close(p_packed, p_unpacked, atol=1e-5)
