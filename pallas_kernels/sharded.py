"""Ragged paged attention over a mesh: the single-device kernel inside `jax.shard_map`.

Attention never mixes heads, so tensor parallelism needs no communication: each device of
the 'tensor' axis takes K/tp kv heads and the N/tp q heads that read them, and runs the
one-device kernel on those. Contiguous splits line up: q head n reads kv head n // G, so
q heads [i N/tp, (i+1) N/tp) read kv heads [i K/tp, (i+1) K/tp), which sit in cache slots
[2i K/tp, 2(i+1) K/tp) of axis 2 (K at even, V at odd): whole (K, V) pairs whenever
tp divides K. The metadata is replicated.

Every other mesh axis ('data', 'fsdp') is left out of the specs: the serving batch is
replicated over them, so each device of a tensor group computes the same shard. When
the 'tensor' axis does not divide the kv heads (the model's `_fit` then replicates them)
or there is none, every device runs the whole call on replicated inputs.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import AxisType, PartitionSpec

TENSOR_AXIS = "tensor"


def free_axes(mesh) -> tuple[str, ...]:
    """The mesh axes an enclosing shard_map has not already made manual."""
    return tuple(
        name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind != AxisType.Manual
    )


def num_free_devices(mesh) -> int:
    """Devices a call under `mesh` spans, not counting axes already split by a shard_map."""
    if mesh.empty:
        return 1
    return math.prod(mesh.shape[name] for name in free_axes(mesh))


def num_tensor_shards(mesh, num_kv_heads: int) -> int:
    """How many ways the heads split: the free 'tensor' axis when it divides the kv heads,
    else 1 (replicated, as `model.sharding._fit` places such heads)."""
    if TENSOR_AXIS not in free_axes(mesh):
        return 1
    tp = mesh.shape[TENSOR_AXIS]
    return tp if num_kv_heads % tp == 0 else 1


def _explicit_part(spec: PartitionSpec, mesh) -> PartitionSpec:
    """`spec` with only the Explicit mesh axes, the ones an array's type carries."""
    explicit = {n for n, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Explicit}
    return PartitionSpec(*(axis if axis in explicit else None for axis in spec))


def sharded_ragged_paged_attention(
    kernel,
    mesh,
    q: jax.Array,  # [T, N, H]
    kv_cache: jax.Array,  # [P, L, 2K, H]
    kv_lens: jax.Array,  # i32[S]
    page_indices: jax.Array,  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[S + 1]
    num_seqs: jax.Array,  # i32[1]
    **kwargs,
) -> jax.Array:  # [T, N, H], sharded on N over 'tensor' when the heads split
    """`kernel(q, kv_cache, ..., **kwargs)` run per device of `mesh` on its heads."""
    tp = num_tensor_shards(mesh, kv_cache.shape[2] // 2)
    axis = TENSOR_AXIS if tp > 1 else None
    heads = PartitionSpec(None, axis, None)  # [T, N, H]
    cache = PartitionSpec(None, None, axis, None)  # [P, L, 2K, H]
    replicated = PartitionSpec()
    in_specs = (heads, cache, replicated, replicated, replicated, replicated)
    split = jax.shard_map(
        functools.partial(kernel, **kwargs),
        mesh=mesh,
        in_specs=in_specs,
        out_specs=heads,
        axis_names=set(free_axes(mesh)),
        # Unchecked, as the kernels are opaque calls; sound by construction: the inputs
        # vary only over 'tensor', which out_specs names, and are equal over the rest.
        check_vma=False,
    )
    args = (q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    if AxisType.Explicit not in mesh.axis_types:
        return split(*args)
    # Explicit axes are part of the arrays' types: shard_map takes inputs already typed as
    # its in_specs, and the caller gets the output typed as its q.
    args = [jax.reshard(x, _explicit_part(spec, mesh)) for x, spec in zip(args, in_specs)]
    return jax.reshard(split(*args), jax.typeof(q).sharding.spec)
