"""The jitted serving step: `model_step(params, kv_caches, tokens, md) -> (kv_caches, logits)`.

The NNX module is split once into a static graph and its parameters; the hot loop calls a
pure function of arrays. The KV caches are donated: they are the largest buffers and are
never read after the step that rewrites them.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from tandem.model.attention_metadata import AttentionMetadata
from tandem.model.transformer import Transformer


def make_model_step(model: Transformer):
    """Returns (step, params); `step(params, kv_caches, tokens, md)` is jitted."""
    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(params, kv_caches: list[jax.Array], tokens: jax.Array, md: AttentionMetadata):
        module = nnx.merge(graphdef, params)
        logits, kv_caches = module.forward_paged(tokens, kv_caches, md)
        return kv_caches, logits  # [T, V]

    return step, params
