"""The public entry point: validates arguments, then dispatches by backend.

CPU runs the pure-JAX reference; TPU runs the Mosaic TPU kernel (pallas_kernels/tpu/);
GPU runs the reference until the Mosaic GPU kernel lands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tandem.pallas_kernels.reference import ragged_paged_attention_reference
from tandem.pallas_kernels.tpu import ragged_paged_attention_tpu


def validate(q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs, sliding_window, soft_cap):
    """Raises ValueError naming the bad argument; shapes only, so it runs at trace time."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got shape {q.shape}")
    if kv_cache.ndim != 4:
        raise ValueError(f"kv_cache must be [P, L, 2K, H], got shape {kv_cache.shape}")
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, num_combined, kv_head_dim = kv_cache.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"kv_cache head dim {kv_head_dim} != q head dim {head_dim}")
    if num_combined % 2:
        raise ValueError(
            f"kv_cache axis 2 holds K and V interleaved and must be even, got {num_combined}"
        )
    if num_q_heads % (num_combined // 2):
        raise ValueError(
            f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_combined // 2})"
        )
    if kv_lens.ndim != 1 or page_indices.ndim != 2 or kv_lens.shape[0] != page_indices.shape[0]:
        raise ValueError(
            f"kv_lens [S] and page_indices [S, pages_per_seq] disagree: "
            f"{kv_lens.shape} vs {page_indices.shape}"
        )
    if cu_q_lens.shape != (kv_lens.shape[0] + 1,):
        raise ValueError(
            f"cu_q_lens must be [S + 1] = [{kv_lens.shape[0] + 1}], got {cu_q_lens.shape}"
        )
    if num_seqs.shape != (1,):
        raise ValueError(f"num_seqs must be i32[1], got shape {num_seqs.shape}")
    for name, x in (
        ("kv_lens", kv_lens),
        ("page_indices", page_indices),
        ("cu_q_lens", cu_q_lens),
        ("num_seqs", num_seqs),
    ):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array, got {x.dtype}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if soft_cap is not None and soft_cap <= 0:
        raise ValueError(f"soft_cap must be positive, got {soft_cap}")
    del num_tokens


def ragged_paged_attention(
    q: jax.Array,  # [T, N, H]
    kv_cache: jax.Array,  # [P, L, 2K, H]
    kv_lens: jax.Array,  # i32[S]
    page_indices: jax.Array,  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[S + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:  # [T, N, H]
    """Attention of ragged query chunks over their sequences' paged K/V (see reference.py)."""
    validate(q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs, sliding_window, soft_cap)
    kernel = (
        ragged_paged_attention_tpu
        if jax.default_backend() == "tpu"
        else ragged_paged_attention_reference
    )
    return kernel(
        q,
        kv_cache,
        kv_lens,
        page_indices,
        cu_q_lens,
        num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
