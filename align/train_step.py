"""The one jitted training step every trainer shares: accumulate, clip, update.

`train_step(state, batch) -> (state, metrics)`. The batch's leading axis holds the whole
optimizer batch; it is cut into `grad_accum_steps` micro-batches and scanned. A loss never
averages over its own micro-batch: it divides by `normalizer`, the denominator of the WHOLE
batch (tokens, sequences or pairs, from `denominator(batch)`), so the micro-batch losses
and gradients add up to exactly those of one big batch (TRL's `num_items_in_batch`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

# loss_fn(model, micro_batch, normalizer, rng) -> (loss, metrics)
LossFn = Callable[[nnx.Module, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]
# denominator(batch) -> scalar: the whole batch's count the loss divides by
DenominatorFn = Callable[[dict], jax.Array]


@flax.struct.dataclass
class TrainState:
    params: Any  # nnx.State of the trainable module
    opt_state: Any
    step: jax.Array  # i32[]
    rng: jax.Array  # u32[2] raw key data: checkpoints store plain arrays, not typed keys


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    opt_state = jax.jit(optimizer.init)(params)
    rng = jax.random.key_data(jax.random.key(seed))
    return TrainState(params, opt_state, jnp.zeros((), jnp.int32), rng)


def split_micro(batch: dict, num_micro: int) -> dict:
    """[A*M, ...] -> [A, M, ...] for every array of the batch."""

    def cut(x):
        if x.shape[0] % num_micro:
            raise ValueError(
                f"batch axis {x.shape[0]} is not a multiple of grad_accum_steps {num_micro}"
            )
        return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])

    return jax.tree.map(cut, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    denominator: DenominatorFn,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    num_epochs: int = 1,
    num_minibatches: int = 1,
    schedule: optax.Schedule | None = None,
):
    """Returns the jitted `train_step(state, batch) -> (state, metrics)`, state donated.

    One call makes `num_epochs * num_minibatches` optimizer updates (PPO's epochs over
    shuffled minibatches of one rollout batch; 1 * 1 for SFT, RM and DPO), each accumulated
    over `grad_accum_steps` micro-batches. Metrics are averaged over the updates.
    """

    def micro_loss(params, micro_batch, normalizer, rng):
        return loss_fn(nnx.merge(graphdef, params), micro_batch, normalizer, rng)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def update(carry, xs):
        params, opt_state, count = carry
        minibatch, key = xs
        normalizer = jnp.maximum(denominator(minibatch).astype(jnp.float32), 1e-8)
        micro = split_micro(minibatch, grad_accum_steps)

        def body(acc, xs):
            grads, loss = acc
            micro_batch, index = xs
            (micro_l, metrics), micro_g = grad_fn(
                params, micro_batch, normalizer, jax.random.fold_in(key, index)
            )
            return (jax.tree.map(jnp.add, grads, micro_g), loss + micro_l), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss), metrics = jax.lax.scan(
            body, (zeros, jnp.zeros((), jnp.float32)), (micro, jnp.arange(grad_accum_steps))
        )
        # Ratios (accuracy, clip fraction) are averaged over micro-batches.
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        if schedule is not None:
            metrics["learning_rate"] = schedule(count)
        return (params, opt_state, count + 1), metrics

    def epoch(carry, key):
        batch = carry[-1]
        if num_minibatches > 1:
            size = jax.tree.leaves(batch)[0].shape[0]
            order = jax.random.permutation(key, size)
            batch = jax.tree.map(lambda x: x[order], batch)
        minibatches = split_micro(batch, num_minibatches)
        keys = jax.random.split(jax.random.fold_in(key, 1), num_minibatches)
        inner, metrics = jax.lax.scan(update, carry[:-1], (minibatches, keys))
        return (*inner, carry[-1]), metrics

    def step(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        num_updates = state.step * num_epochs * num_minibatches
        carry = (state.params, state.opt_state, num_updates, batch)
        (params, opt_state, _, _), metrics = jax.lax.scan(
            epoch, carry, jax.random.split(step_rng, num_epochs)
        )
        metrics = jax.tree.map(lambda m: jnp.mean(m.reshape(-1), axis=0), metrics)
        new_state = TrainState(params, opt_state, state.step + 1, jax.random.key_data(rng))
        return new_state, metrics

    # Donated: the state (params + two Adam moments) is the largest buffer and is never
    # read after the step.
    return jax.jit(step, donate_argnums=0)
