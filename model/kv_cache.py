"""KV memory: one array per layer, [P, L, 2K, H], K at even and V at odd slots of axis 2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from tandem.model.config import ModelConfig

KV_AXES = ("cache_pages", "cache_page_size", "cache_kv_heads", "head_dim")


def init_kv_cache(
    cfg: ModelConfig, num_pages: int, page_size: int, dtype=jnp.bfloat16, sharding=None
) -> list[jax.Array]:
    """Zeroed pages for every layer; `sharding` places them (KV heads over `tensor`)."""
    shape = (num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
    return [jnp.zeros(shape, dtype, device=sharding) for _ in range(cfg.num_layers)]


def write_kv(
    kv_cache: jax.Array,  # [P, L, 2K, H]
    k: jax.Array,  # [T, K, H]
    v: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # i32[T]; -1 drops the token
) -> jax.Array:
    """Scatters this step's K/V into their slots; padding slots (-1) write nothing."""
    num_pages, page_size, num_combined, head_dim = kv_cache.shape
    num_slots = num_pages * page_size
    # [T, K, 2, H] -> [T, 2K, H]: K at even, V at odd.
    kv = jnp.stack([k, v], axis=2).reshape(k.shape[0], num_combined, head_dim)
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)  # out of range: dropped
    flat = kv_cache.reshape(num_slots, num_combined, head_dim)
    flat = flat.at[slots].set(kv.astype(kv_cache.dtype), mode="drop")
    return flat.reshape(kv_cache.shape)
