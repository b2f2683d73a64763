"""Sharding by name: model code names logical axes, one rules table maps them to mesh axes.

The mesh has the axes ('data', 'fsdp', 'tensor'). Weights are annotated with logical axes
(`('embed', 'q_heads', 'head_dim')`); activations are constrained with `constrain(x, names)`.
`LOGICAL_RULES` is the default table; gin rebinds `logical_rules.rules` to change it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import gin
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or a tuple of them, or None for replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # weights
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_tokens", None),
    # KV pages: [P, L, 2K, H], sharded on kv heads.
    ("cache_pages", None),
    ("cache_page_size", None),
    ("cache_kv_heads", "tensor"),
)


def mesh_context(mesh):
    """`jax.set_mesh(mesh)`, or a context that does nothing when `mesh` is None. Under a
    mesh, `constrain` pins activations to it and attention runs per device on its kv
    heads (pallas_kernels/sharded.py)."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


@gin.configurable
def logical_rules(rules: Sequence[tuple[str, object]] = LOGICAL_RULES) -> tuple:
    """The rules table in force (gin: `logical_rules.rules = [...]`)."""
    return tuple((name, tuple(m) if isinstance(m, list) else m) for name, m in rules)


@gin.configurable
def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got {shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices do not divide into {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"make_mesh: shape {dict(zip(MESH_AXES, shape))} needs "
            f"{int(np.prod(shape))} devices, have {len(devices)}"
        )
    return jax.make_mesh(
        tuple(shape), MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 3
    )


def logical_to_spec(names: Sequence[str | None], rules=None) -> PartitionSpec:
    """('embed', 'mlp') -> PartitionSpec('fsdp', 'tensor'); a mesh axis is used once at most."""
    table = dict(rules if rules is not None else logical_rules())
    used: set[str] = set()
    out = []
    for name in names:
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        flat = tuple(a for a in flat if a not in used)
        used.update(flat)
        out.append(None if not flat else flat[0] if len(flat) == 1 else flat)
    return PartitionSpec(*out)


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide a dimension (a 2-head model on tensor=4 replicates)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in flat])) if flat else 1
        out.append(axes if dim % size == 0 else None)
    return PartitionSpec(*out)


def named_sharding(mesh, names, shape, rules=None) -> NamedSharding:
    return NamedSharding(mesh, _fit(logical_to_spec(names, rules), shape, mesh))


def constrain(x: jax.Array, names: Sequence[str | None], rules=None) -> jax.Array:
    """Pins an activation's layout under the ambient mesh (`jax.set_mesh`); a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = _fit(logical_to_spec(names, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def state_shardings(state, mesh, rules=None):
    """The NamedSharding of every variable in an nnx.State, from its `logical_axes`."""
    from flax import nnx

    def one(variable):
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
        return variable.replace(named_sharding(mesh, axes, variable.shape, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model, mesh, rules=None):
    """Places an existing NNX model's variables on `mesh` by their logical axes."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh, rules))
    return nnx.merge(graphdef, state)


def create_sharded(make_model, mesh, rules=None):
    """Builds `make_model()` directly into its shards: no device ever holds a full copy."""
    from flax import nnx

    abstract = nnx.eval_shape(make_model)
    graphdef, abs_state = nnx.split(abstract)
    out_shardings = state_shardings(abs_state, mesh, rules)
    state = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)
