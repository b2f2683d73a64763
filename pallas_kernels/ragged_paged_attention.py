"""The public entry point: validates arguments, then dispatches by backend.

CPU runs the pure-JAX reference; TPU runs the Mosaic TPU kernel (pallas_kernels/tpu/);
GPU runs the Mosaic GPU kernel (pallas_kernels/gpu/) on Hopper and the reference when
`gpu_fallback_reason` names a reason: a non-Hopper GPU, inputs the kernel does not take
(see gpu/kernel.py `unsupported_reason`: f32 or mixed dtypes, head_dim other than 64/128,
page sizes outside 8..128 or not a multiple of 8, more than 64 q heads per kv head), or
arrays spread over several devices with no ambient mesh to split them by.

Under an ambient mesh (`jax.set_mesh`) of more than one device, the chosen kernel runs per
device inside `jax.shard_map`, on its share of the heads (sharded.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tandem.pallas_kernels.reference import ragged_paged_attention_reference
from tandem.pallas_kernels.sharded import num_free_devices, sharded_ragged_paged_attention
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


def _is_sharded(*arrays) -> bool:
    """True when an array is placed on (or, with explicit sharding, typed over) more than
    one device, not counting mesh axes an enclosing shard_map has already split."""
    for x in arrays:
        if isinstance(x, jax.core.Tracer):
            mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
            if mesh is not None and num_free_devices(mesh) > 1:
                return True
        elif isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            return True
    return False


def _compute_capability() -> str:
    return str(getattr(jax.devices()[0], "compute_capability", ""))


def gpu_fallback_reason(q, kv_cache, page_indices) -> str | None:
    """Why a GPU call runs the reference instead of the Mosaic GPU kernel; None if not."""
    capability = _compute_capability()
    if not capability.startswith("9"):
        return f"compute capability {capability or '?'}: the kernel needs Hopper (9.x)"
    is_split = num_free_devices(jax.sharding.get_abstract_mesh()) > 1
    if not is_split and _is_sharded(q, kv_cache, page_indices):
        return (
            "inputs span several devices but no ambient mesh says how to split them: "
            "call under jax.set_mesh(mesh) to run the kernel per shard"
        )
    from tandem.pallas_kernels.gpu import unsupported_reason

    # Per shard the dtypes, head_dim, page size and group are those of the whole call.
    return unsupported_reason(q, kv_cache)


def _single_device_kernel(q, kv_cache, page_indices):
    """The kernel one device runs for these inputs on this backend."""
    backend = jax.default_backend()
    if backend == "tpu":
        return ragged_paged_attention_tpu
    if backend == "gpu" and gpu_fallback_reason(q, kv_cache, page_indices) is None:
        # Imported here: CPU and TPU processes never load Mosaic GPU.
        from tandem.pallas_kernels.gpu import ragged_paged_attention_gpu

        return ragged_paged_attention_gpu
    return ragged_paged_attention_reference


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
    kernel = _single_device_kernel(q, kv_cache, page_indices)
    args = (q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    mesh = jax.sharding.get_abstract_mesh()
    if num_free_devices(mesh) > 1:
        return sharded_ragged_paged_attention(kernel, mesh, *args, **kwargs)
    return kernel(*args, **kwargs)
