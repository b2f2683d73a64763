"""The model runs unchanged on 1 device and on a mesh of 8 fake CPU devices.

tests/conftest.py gives every test process 8 CPU devices; the single-device runs use the
first. Sharded runs must equal the single-device ones (f32, 1e-4): the mesh changes where
arithmetic happens, not what it computes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from paged_harness import greedy_generate

from tandem.model import ModelConfig, Transformer
from tandem.model.sharding import (
    create_sharded,
    logical_to_spec,
    make_mesh,
    shard_model,
)

CFG = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    model_type="qwen2",
)
MESHES = {
    "fsdp4_tp2": dict(data=1, fsdp=4, tensor=2),
    "dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2),
}


def test_eight_devices_are_visible():
    assert jax.device_count() == 8


def test_logical_rules_map_weights_to_mesh_axes():
    assert logical_to_spec(("embed", "q_heads", "head_dim")) == P("fsdp", "tensor", None)
    assert logical_to_spec(("mlp", "embed")) == P("tensor", "fsdp")
    # a mesh axis is used once per array even if two logical axes map to it
    assert logical_to_spec(("q_heads", "mlp")) == P("tensor", None)
    with pytest.raises(ValueError, match="no rule"):
        logical_to_spec(("not_an_axis",))


def test_make_mesh_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh(data=1, fsdp=3, tensor=2)
    with pytest.raises(ValueError, match="at most one axis"):
        make_mesh(data=-1, fsdp=-1, tensor=1)


@pytest.fixture(scope="module")
def reference():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    tokens = np.random.RandomState(0).randint(0, CFG.vocab_size, (4, 24))
    return model, tokens, np.asarray(model(jnp.asarray(tokens)))


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_training_forward_sharded_equals_single_device(reference, mesh_name):
    model, tokens, expected = reference
    mesh = make_mesh(**MESHES[mesh_name])
    sharded = shard_model(model, mesh)
    q = sharded.layers[0].attn.q_proj[...]
    assert q.sharding.spec == P("fsdp", "tensor", None)
    # [D, N, H] = [64, 4, 16]: D split over fsdp, heads over tensor, one shard per device
    shard = (64 // mesh.shape["fsdp"], 4 // mesh.shape["tensor"], 16)
    assert {s.data.shape for s in q.addressable_shards} == {shard}
    assert len(q.addressable_shards) == 8
    graphdef, state = nnx.split(sharded)

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    with jax.set_mesh(mesh):
        tokens_sharded = jax.device_put(tokens, jax.NamedSharding(mesh, P(("data", "fsdp"))))
        logits = forward(state, tokens_sharded)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_create_sharded_builds_shards_directly():
    mesh = make_mesh(fsdp=4, tensor=2)
    model = create_sharded(lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
    reference = Transformer(CFG, rngs=nnx.Rngs(0))
    down = model.layers[1].mlp.down_proj[...]
    assert down.sharding.spec == P("tensor", "fsdp")
    # same values as an unsharded init (jit may round the normal sampler differently by 1 ulp)
    want = np.asarray(reference.layers[1].mlp.down_proj[...])
    np.testing.assert_allclose(np.asarray(down), want, rtol=1e-6, atol=1e-9)


def test_paged_forward_sharded_equals_training_forward(reference):
    """Prefill in chunks then decode on the mesh, KV pages sharded on kv heads."""
    model, _, _ = reference
    mesh = make_mesh(fsdp=4, tensor=2)
    sharded = shard_model(model, mesh)
    prompts = [[5, 9, 3], list(range(1, 20))]
    with jax.set_mesh(mesh):
        outs, logits = greedy_generate(
            sharded, prompts, 8, page_size=4, token_budget=8, return_logits=True, mesh=mesh
        )
    for prompt, out, got in zip(prompts, outs, logits):
        full = prompt + out
        want = np.asarray(model(jnp.asarray([full])))[0, :-1]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_checkpoint_loads_straight_into_shards(reference, tmp_path):
    """load_model(mesh=...) places each weight by its logical axes as it reads it."""
    from tandem.model.hf import load_model, save_model

    model, tokens, expected = reference
    save_model(model, str(tmp_path))
    mesh = make_mesh(fsdp=4, tensor=2)
    loaded = load_model(str(tmp_path), mesh=mesh)
    assert loaded.layers[0].mlp.gate_proj[...].sharding.spec == P("fsdp", "tensor")
    assert loaded.embed[...].sharding.spec == P("tensor", "fsdp")
    graphdef, state = nnx.split(loaded)
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
