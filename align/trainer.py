"""The generic training loop: data -> jitted train_step -> metrics -> orbax checkpoints.

Each algorithm (SFT, RM, DPO, PPO, GRPO) is an `Algorithm`: it turns what the data iterator
yields into a device batch (for RL that means rollouts, rewards and advantages), and owns the
loss. The loop owns everything else: optimizer state, resume, accumulation, logging, NaN
checks and checkpoints. A killed run restarts from its last checkpoint, data iterator and
RNG included, and continues as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Protocol

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from tandem.align.train_config import TrainConfig, learning_rate_schedule, make_optimizer
from tandem.align.train_step import TrainState, init_state, make_train_step
from tandem.model.sharding import make_mesh, mesh_context, named_sharding, state_shardings


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN or Inf; the message names the step."""


class Algorithm(Protocol):
    def loss(self, model, batch: dict, normalizer: jax.Array, rng: jax.Array):
        """(loss, metrics) of one micro-batch; divides by `normalizer` (see train_step)."""

    def denominator(self, batch: dict) -> jax.Array:
        """The whole batch's count the loss divides by."""

    def prepare(self, state: TrainState, data_iter, step: int) -> tuple[dict, dict]:
        """(numpy batch, host metrics incl. time/* seconds), drawing from `data_iter` (RL
        draws more than one batch when dynamic sampling drops groups)."""

    def after_update(self, state: TrainState) -> dict:
        """Runs after each optimizer step (RL: hands the new params to the engine); metrics."""


@dataclasses.dataclass
class RunResult:
    state: TrainState
    module: nnx.Module  # the trainable module holding the final params
    last_metrics: dict
    start_step: int


def build_mesh(cfg: TrainConfig):
    """None for one device; otherwise the ('data', 'fsdp', 'tensor') mesh of cfg.mesh_shape."""
    if math.prod(abs(s) for s in cfg.mesh_shape) == 1 and -1 not in cfg.mesh_shape:
        return None
    return make_mesh(*cfg.mesh_shape)


def shard_batch(batch: dict, mesh) -> dict:
    """Numpy batch -> device arrays, split over ('data', 'fsdp') on the batch axis."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)

    def put(x):
        x = np.asarray(x)
        names = ("act_batch",) + (None,) * (x.ndim - 1)
        return jax.device_put(x, named_sharding(mesh, names, x.shape))

    return jax.tree.map(put, batch)


def on_mesh_sharding(sharding, mesh):
    """`sharding` of an array on `mesh`; replicated over it for an array on one device."""
    if isinstance(sharding, SingleDeviceSharding):
        return NamedSharding(mesh, PartitionSpec())
    return sharding


def fit(
    cfg: TrainConfig,
    module: nnx.Module,
    algorithm: Algorithm,
    data_iter,
    *,
    mesh=None,
    export=None,
) -> RunResult:
    """Trains `module` (its whole nnx state is trainable) for cfg.num_steps optimizer steps.

    `data_iter` is a grain iterator (get_state/set_state); its state is checkpointed with the
    params, the optimizer, the step and the RNG. `export(module, run_dir)` runs at the end
    (e.g. writes the policy in Hugging Face format).
    """
    from tandem.align.checkpoint import Checkpointer
    from tandem.align.metrics_log import MetricsLogger, write_config

    os.makedirs(cfg.run_dir, exist_ok=True)
    write_config(cfg.run_dir, gin.config_str())
    optimizer = make_optimizer(cfg)
    graphdef, params = nnx.split(module)
    if mesh is not None:
        params = jax.device_put(params, state_shardings(params, mesh))
    state = init_state(params, optimizer, cfg.seed)
    shardings = None
    if mesh is not None:
        # The train step hands its state back with equivalent shardings spelled its own way
        # (P('fsdp', 'tensor') for P('fsdp', 'tensor', None)), which jit keys as new input
        # types: put back on these after each step (no data moves), every step reuses the
        # first one's compilation. The step, the RNG key and optax's counts start on one
        # device: replicated, as the step returns them.
        shardings = jax.tree.map(lambda x: on_mesh_sharding(x.sharding, mesh), state)
        state = jax.device_put(state, shardings)
    checkpointer = Checkpointer(
        os.path.join(cfg.run_dir, "checkpoints"),
        save_every=cfg.save_every or cfg.num_steps,
        keep=cfg.keep_checkpoints,
    )
    start = checkpointer.latest_step() or 0
    if start:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        state, data_state = checkpointer.restore(start, abstract)
        data_iter.set_state(data_state["data_iter"])
        nnx.update(module, state.params)
        algorithm.after_update(state)
    train_step = make_train_step(
        graphdef,
        algorithm.loss,
        algorithm.denominator,
        optimizer,
        grad_accum_steps=cfg.grad_accum_steps,
        num_epochs=getattr(algorithm, "num_epochs", 1),
        num_minibatches=getattr(algorithm, "num_minibatches", 1),
        schedule=learning_rate_schedule(cfg),
    )
    # One writer per run: on multi-host runs process 0 logs.
    logger = MetricsLogger(
        cfg.run_dir,
        total_steps=cfg.num_steps,
        start_step=start,
        progress=cfg.progress and jax.process_index() == 0,
        tensorboard=jax.process_index() == 0,
    )
    metrics: dict = {}
    try:
        for step in range(start, cfg.num_steps):
            batch, host_metrics = algorithm.prepare(state, data_iter, step)
            t0 = time.perf_counter()
            with mesh_context(mesh):
                state, device_metrics = train_step(state, shard_batch(batch, mesh))
            if shardings is not None:
                state = jax.device_put(state, shardings)
            device_metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            host_metrics["time/update"] = time.perf_counter() - t0
            for name in ("loss", "grad_norm"):
                if not np.isfinite(device_metrics[name]):
                    raise TrainingDiverged(
                        f"step {step + 1}: {name} is {device_metrics[name]} "
                        f"(last checkpoint: step {checkpointer.latest_step() or 'none'})"
                    )
            t0 = time.perf_counter()
            host_metrics.update(algorithm.after_update(state))
            host_metrics["time/handoff"] = time.perf_counter() - t0
            metrics = {**device_metrics, **host_metrics}
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.num_steps:
                logger.log(step + 1, metrics)
            if checkpointer.should_save(step + 1) or step + 1 == cfg.num_steps:
                checkpointer.save(
                    step + 1,
                    state,
                    {"data_iter": data_iter.get_state()},
                    force=step + 1 == cfg.num_steps,
                )
        checkpointer.wait()
    finally:
        logger.close()
        checkpointer.close()
    nnx.update(module, state.params)
    if export is not None:
        export(module, cfg.run_dir)
    return RunResult(state, module, metrics, start)
