"""Ragged paged attention under a mesh equals the single-device call.

tests/conftest.py gives the process 8 CPU devices. Under `jax.set_mesh`, the public entry
point runs the kernel inside `jax.shard_map`, each device of the 'tensor' axis on K/tp kv
heads and the N/tp q heads that read them; 'data' and 'fsdp' replicate the call. Heads
are computed independently, so the sharded output equals the unsharded one to rounding.
"""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from rpa_cases import make_inputs

from tandem.model.sharding import make_mesh
from tandem.pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference

rpa_module = importlib.import_module("tandem.pallas_kernels.ragged_paged_attention")
gpu_package = importlib.import_module("tandem.pallas_kernels.gpu")

PAGE = 8
# (q_len, kv_len) per sequence: first token, decodes at and past a page boundary, a fresh
# prompt of one page, a prefill chunk continuing a longer context.
MIXED = [(1, 1), (1, 2 * PAGE), (PAGE, PAGE), (5, 2 * PAGE + 3), (1, 21)]
MESHES = {
    "fsdp4_tp2": dict(fsdp=4, tensor=2),
    "fsdp2_tp4": dict(fsdp=2, tensor=4),
    "dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2),
}
F32 = dict(atol=1e-6, rtol=1e-6)
# bf16 output: the split call may round a value the other way, one bf16 ulp (2^-8 relative).
BF16 = dict(atol=1e-6, rtol=2**-7)


def inputs_for(num_kv_heads, group=2, head_dim=16):
    return make_inputs(
        MIXED, page_size=PAGE, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim
    )


def find_shard_map(jaxpr):
    """The first shard_map equation in `jaxpr` or the jaxprs nested in it (jit's)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            return eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns") and (found := find_shard_map(inner)) is not None:
                return found
    return None


def shard_map_input_shapes(fn, *args) -> list[tuple[int, ...]] | None:
    """The per-device shapes of the first shard_map in `fn`; None if it has none."""
    eqn = find_shard_map(jax.make_jaxpr(fn)(*args).jaxpr)
    return None if eqn is None else [v.aval.shape for v in eqn.params["jaxpr"].invars]


def run_on_mesh(mesh, inputs, **kw):
    fn = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.25, **kw))
    with jax.set_mesh(mesh):
        return fn(*inputs.args()), shard_map_input_shapes(fn, *inputs.args())


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_sharded_equals_single_device(mesh_name, sliding_window):
    mesh = make_mesh(**MESHES[mesh_name])
    tp = mesh.shape["tensor"]
    inputs = inputs_for(num_kv_heads=4)  # N = 8, K = 4: both split by tp in {2, 4}
    want = ragged_paged_attention_reference(
        *inputs.args(), sm_scale=0.25, sliding_window=sliding_window
    )
    got, shapes = run_on_mesh(mesh, inputs, sliding_window=sliding_window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32)
    # Each device saw its share of the q heads and whole (K, V) pairs of the cache; the
    # metadata whole.
    t, n, h = inputs.q.shape
    p, page, num_combined, _ = inputs.kv_cache.shape
    assert shapes[:2] == [(t, n // tp, h), (p, page, num_combined // tp, h)]
    assert shapes[2:] == [x.shape for x in inputs.args()[2:]]
    assert {s.data.shape for s in got.addressable_shards} == {(t, n // tp, h)}


def test_kv_heads_the_tensor_axis_does_not_divide_run_replicated():
    """2 kv heads on tensor=4: the model replicates them, so every device runs the whole
    call (a shard_map that splits nothing) and the result is still exact."""
    mesh = make_mesh(fsdp=2, tensor=4)
    inputs = inputs_for(num_kv_heads=2, group=3)
    want = ragged_paged_attention_reference(*inputs.args(), sm_scale=0.25)
    got, shapes = run_on_mesh(mesh, inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32)
    assert shapes == [x.shape for x in inputs.args()]


def test_mesh_without_a_tensor_axis_runs_replicated():
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    inputs = inputs_for(num_kv_heads=4)
    want = ragged_paged_attention_reference(*inputs.args(), sm_scale=0.25)
    got, shapes = run_on_mesh(mesh, inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32)
    assert shapes == [x.shape for x in inputs.args()]


@pytest.mark.parametrize("is_q_sharded", [False, True])
def test_explicit_axes_reshard_in_and_return_qs_type(is_q_sharded):
    """Explicit mesh axes are part of array types: the call reshards its inputs to the
    per-head split and hands back the output typed like q."""
    mesh = jax.make_mesh((2, 4), ("tensor", "fsdp"), axis_types=(AxisType.Explicit,) * 2)
    inputs = inputs_for(num_kv_heads=4)
    want = ragged_paged_attention_reference(*inputs.args(), sm_scale=0.25)
    q_spec = P(None, "tensor", None) if is_q_sharded else P()
    with jax.set_mesh(mesh):
        q = jax.device_put(inputs.q, q_spec)
        got, shapes = run_on_mesh(mesh, dataclasses.replace(inputs, q=q))
        assert jax.typeof(got).sharding.spec == jax.typeof(q).sharding.spec
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32)
    assert shapes[1][2] == inputs.kv_cache.shape[2] // 2


def test_no_mesh_no_shard_map():
    inputs = inputs_for(num_kv_heads=4)
    fn = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.25))
    assert shard_map_input_shapes(fn, *inputs.args()) is None


def test_inside_a_callers_shard_map_the_tensor_axis_is_not_split_again():
    """A caller already manual over 'tensor' hands each device its own heads; the entry
    point then splits only the axes still free (none over heads)."""
    mesh = make_mesh(fsdp=4, tensor=2)
    inputs = inputs_for(num_kv_heads=4)
    want = ragged_paged_attention_reference(*inputs.args(), sm_scale=0.25)
    heads, cache = P(None, "tensor", None), P(None, None, "tensor", None)
    per_device = jax.shard_map(
        lambda *a: ragged_paged_attention(*a, sm_scale=0.25),
        mesh=mesh,
        in_specs=(heads, cache, P(), P(), P(), P()),
        out_specs=heads,
        axis_names={"tensor"},
    )
    with jax.set_mesh(mesh):
        got = jax.jit(per_device)(*inputs.args())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32)


@pytest.fixture
def fake_hopper(monkeypatch):
    """A 9.0 GPU backend whose kernel is a recorder of per-device q shapes running the
    reference (as in test_gpu_kernel.py)."""
    shapes = []

    def kernel(q, *args, **kw):
        shapes.append(q.shape)
        return ragged_paged_attention_reference(q, *args, **kw)

    monkeypatch.setattr(rpa_module.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(rpa_module, "_compute_capability", lambda: "9.0")
    monkeypatch.setattr(gpu_package, "ragged_paged_attention_gpu", kernel)
    return shapes


def gpu_inputs():
    return make_inputs(
        MIXED, page_size=16, num_kv_heads=2, group=4, head_dim=64, dtype=jnp.bfloat16
    )


def test_gpu_kernel_runs_per_shard_under_a_mesh(fake_hopper):
    mesh = make_mesh(fsdp=4, tensor=2)
    inputs = gpu_inputs()
    assert rpa_module.gpu_fallback_reason(*inputs.args()[:2], inputs.page_indices) is None
    got, _ = run_on_mesh(mesh, inputs)
    t, n, h = inputs.q.shape
    assert set(fake_hopper) == {(t, n // 2, h)}  # per device: its 4 of the 8 q heads
    want = ragged_paged_attention_reference(*inputs.args(), sm_scale=0.25)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **BF16)


def test_gpu_arrays_sharded_without_a_mesh_fall_back(fake_hopper):
    """Without an ambient mesh there is no telling how to split arrays spread over several
    devices; the reference runs and the reason says how to get the kernel."""
    mesh = make_mesh(fsdp=4, tensor=2)
    inputs = gpu_inputs()
    cache = jax.device_put(inputs.kv_cache, NamedSharding(mesh, P(None, None, "tensor")))
    reason = rpa_module.gpu_fallback_reason(inputs.q, cache, inputs.page_indices)
    assert reason is not None and "jax.set_mesh" in reason
    args = (inputs.q, cache, *inputs.args()[2:])
    got = ragged_paged_attention(*args, sm_scale=0.25)
    assert fake_hopper == []
    want = ragged_paged_attention_reference(*inputs.args(), sm_scale=0.25)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **BF16)
