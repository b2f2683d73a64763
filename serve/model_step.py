"""The jitted serving step: `model_step(params, kv_caches, tokens, md) -> (kv_caches, logits)`.

The NNX module is split once into a static graph and its parameters; the hot loop calls a
pure function of arrays. The KV caches are donated: they are the largest buffers and are
never read after the step that rewrites them.

With a mesh, the step is traced and run under `jax.set_mesh(mesh)`: the model's
`constrain` calls then pin activations to the mesh, and attention runs per device on its
kv heads (pallas_kernels/sharded.py). Without one, nothing changes.
"""

from __future__ import annotations

import contextlib
import functools

import jax
from flax import nnx

from tandem.model.attention_metadata import AttentionMetadata
from tandem.model.transformer import Transformer


def mesh_context(mesh):
    """`jax.set_mesh(mesh)`, or a context that does nothing when `mesh` is None."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def make_model_step(model: Transformer, mesh=None):
    """Returns (step, params); `step(params, kv_caches, tokens, md)` runs a jitted step,
    under `mesh` when one is given."""
    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def jitted(params, kv_caches: list[jax.Array], tokens: jax.Array, md: AttentionMetadata):
        module = nnx.merge(graphdef, params)
        logits, kv_caches = module.forward_paged(tokens, kv_caches, md)
        return kv_caches, logits  # [T, V]

    def step(params, kv_caches: list[jax.Array], tokens: jax.Array, md: AttentionMetadata):
        with mesh_context(mesh):
            return jitted(params, kv_caches, tokens, md)

    return step, params
