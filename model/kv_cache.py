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


def page_bytes(cfg: ModelConfig, page_size: int, dtype=jnp.bfloat16) -> int:
    """Bytes of one page across all layers (K and V)."""
    return (
        cfg.num_layers * page_size * 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    )


def num_pages_for_budget(
    cfg: ModelConfig,
    page_size: int,
    *,
    dtype=jnp.bfloat16,
    budget_bytes: int | None = None,
    memory_fraction: float | None = None,
    min_pages: int = 1,
    num_kv_shards: int = 1,
    device=None,
) -> int:
    """How many pages fit: in `budget_bytes` (per device), or in `memory_fraction` of the
    device's memory minus what is already in use (the weights, loaded first).

    Raises ValueError, before anything is allocated, when fewer than `min_pages` fit
    (e.g. one page per sequence the engine must be able to run at once).
    """
    if (budget_bytes is None) == (memory_fraction is None):
        raise ValueError("give exactly one of budget_bytes or memory_fraction")
    # KV heads are sharded over `tensor`: each device holds 1/num_kv_shards of a page.
    per_page = page_bytes(cfg, page_size, dtype) // num_kv_shards
    in_use = 0
    if memory_fraction is not None:
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        device = device or jax.devices()[0]
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            raise ValueError(
                f"{device.platform} device reports no memory limit; give "
                f"budget_bytes instead of memory_fraction"
            )
        in_use = stats.get("bytes_in_use", 0)
        budget_bytes = int(memory_fraction * stats["bytes_limit"]) - in_use
    num_pages = max(budget_bytes, 0) // per_page
    if num_pages < min_pages:
        used = f" after {in_use / 2**30:.2f} GiB in use (weights)" if in_use else ""
        raise ValueError(
            f"KV cache does not fit: {max(budget_bytes, 0) / 2**30:.3f} GiB left{used} holds "
            f"{num_pages} pages of {per_page / 2**20:.2f} MiB ({page_size} tokens x "
            f"{cfg.num_layers} layers), need at least {min_pages}; lower max_num_seqs or "
            f"page_size, raise the memory budget, or shard over more devices"
        )
    return num_pages


def copy_blocks(
    kv_caches: list[jax.Array],
    copies: jax.Array,  # i32[C, 2] (src, dst)
) -> list[jax.Array]:
    """Copy-on-write on device: page dst of every layer becomes a copy of page src."""
    src, dst = copies[:, 0], copies[:, 1]
    return [kv.at[dst].set(kv[src]) for kv in kv_caches]
