"""Checkpointer: sharded round trip, keep-N, resume data, and every damage case is loud."""

import glob
import os
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tandem.align.checkpoint import Checkpointer, CheckpointError
from tandem.align.data import make_dataset


def make_state(mesh):
    fsdp = NamedSharding(mesh, P("fsdp"))
    params = {
        "w": jax.device_put(jnp.arange(64, dtype=jnp.float32).reshape(16, 4), fsdp),  # [16, 4]
        "b": jnp.full((3,), 0.5, jnp.bfloat16),
    }
    opt = optax.adamw(1e-3).init(params)
    return {
        "params": params,
        "opt": opt,
        "step": jnp.int32(7),
        "rng": jax.random.key_data(jax.random.key(3)),  # uint32 [2]
    }


def abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("fsdp",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mesh):
    """A directory with finished checkpoints at steps 2 and 4; tests work on copies."""
    root = tmp_path_factory.mktemp("ckpt") / "run"
    state = make_state(mesh)
    with Checkpointer(root, save_every=2) as ckpt:
        for step in (2, 4):
            assert ckpt.save(step, state, {"iterator": {"next_index": step}, "epoch": 0})
    return root, state


def copy_of(saved, tmp_path):
    root, state = saved
    shutil.copytree(root, tmp_path / "run")
    return str(tmp_path / "run"), state


def test_round_trip_keeps_values_dtypes_and_shardings(saved, tmp_path, mesh):
    root, state = copy_of(saved, tmp_path)
    ckpt = Checkpointer(root, save_every=2)
    assert ckpt.latest_step() == 4
    restored, data = ckpt.restore(4, abstract(state))
    assert data == {"iterator": {"next_index": 4}, "epoch": 0}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert got.dtype == want.dtype and got.sharding == want.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert len(restored["params"]["w"].addressable_shards) == 8  # still split over fsdp
    # Arrays land with the requested sharding, not the saved one.
    replicated = NamedSharding(mesh, P())
    target = abstract(state)
    target["params"]["w"] = jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=replicated)
    restored, _ = ckpt.restore(2, target)
    assert restored["params"]["w"].sharding == replicated
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    ckpt.close()


def test_nnx_params_and_optax_state_round_trip(tmp_path):
    class TrainState(NamedTuple):
        params: Any
        opt_state: Any
        step: Any

    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.RMSNorm(8, rngs=nnx.Rngs(1)))
    _, params = nnx.split(model)
    state = TrainState(params, optax.adam(1e-3).init(params), jnp.int32(5))
    with Checkpointer(tmp_path / "run", save_every=1) as ckpt:
        ckpt.save(5, state, {})
    with Checkpointer(tmp_path / "run", save_every=1) as ckpt:
        restored, _ = ckpt.restore(5, abstract(state))
    assert type(restored) is TrainState and isinstance(restored.params, nnx.State)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(got, want)


def test_save_every_and_keep_collect_old_steps(tmp_path, mesh):
    state = {"x": jnp.ones((8,))}
    ckpt = Checkpointer(tmp_path / "run", save_every=2, keep=2)
    assert ckpt.latest_step() is None
    decisions = [ckpt.should_save(s) for s in range(1, 8)]
    assert decisions == [False, True, False, True, False, True, False]
    for step in (2, 4, 6):
        assert ckpt.save(step, state, {"step": step})
    assert not ckpt.save(5, state, {})  # not due
    assert ckpt.save(7, state, {"step": 7}, force=True)  # e.g. the last step of a run
    assert not ckpt.save(7, state, {}, force=True)  # already on disk: not written again
    ckpt.wait()
    assert sorted(os.listdir(tmp_path / "run")) == ["6", "7"]
    assert ckpt.latest_step() == 7
    assert not ckpt.should_save(6)  # never behind the newest checkpoint
    ckpt.close()


def test_resume_continues_the_data_stream_and_the_state(tmp_path):
    ds = make_dataset(
        [{"x": i} for i in range(5)],
        lambda r: {"x": np.array([r["x"]], np.int32)},  # [1]
        batch_size=2,
        seed=0,
    )
    it = iter(ds)
    state = {"w": jnp.zeros((4,)), "step": jnp.int32(0)}
    with Checkpointer(tmp_path / "run", save_every=3) as ckpt:
        for step in range(1, 5):  # crosses the epoch boundary at step 3
            state = {"w": state["w"] + next(it)["x"].sum(), "step": state["step"] + 1}
            if ckpt.should_save(step):
                ckpt.save(step, state, {"iterator": it.get_state()})
    expected = [next(it)["x"] for _ in range(4)]
    with Checkpointer(tmp_path / "run", save_every=3) as ckpt:  # a new process
        step = ckpt.latest_step()
        restored, data = ckpt.restore(step, abstract(state))
    assert step == 3 and int(restored["step"]) == 3
    resumed = iter(ds)
    resumed.set_state(data["iterator"])
    next(resumed)  # step 4 again
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["x"], want)


def test_unfinished_tmp_save_is_not_the_latest(saved, tmp_path):
    root, state = copy_of(saved, tmp_path)
    # What a save killed by SIGKILL leaves: orbax's tmp directory, partly written.
    os.makedirs(os.path.join(root, "6.orbax-checkpoint-tmp-1712345678/state"))
    ckpt = Checkpointer(root, save_every=2)
    assert ckpt.latest_step() == 4
    _, data = ckpt.restore(4, abstract(state))
    assert data["iterator"] == {"next_index": 4}
    os.makedirs(os.path.join(root, "8.orbax-checkpoint-tmp-1712345679/data"))  # while running
    assert ckpt.latest_step() == 4
    ckpt.close()


def _truncate_arrays(step_dir):
    files = glob.glob(f"{step_dir}/state/**/d/*", recursive=True)
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(8)


def _delete_arrays(step_dir):
    for f in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
        os.remove(f)


def _garbage(name):
    def damage(step_dir):
        with open(os.path.join(step_dir, name), "w") as f:
            f.write("\x00garbage{")

    return damage


DAMAGE = {
    "truncated arrays": (_truncate_arrays, "cannot be restored"),
    "deleted arrays": (_delete_arrays, "cannot be restored"),
    "missing data item": (lambda d: shutil.rmtree(f"{d}/data"), "item 'data' is missing"),
    "garbage step metadata": (_garbage("_CHECKPOINT_METADATA"), "_CHECKPOINT_METADATA is not"),
    "garbage state metadata": (_garbage("state/_METADATA"), "state/_METADATA is not valid"),
    "garbage data item": (_garbage("data/metadata"), "data/metadata is not valid JSON"),
    "no commit marker": (lambda d: os.remove(f"{d}/commit_success.txt"), "not a finished"),
}


# tensorstore may answer a failed read's callback after orbax closed its event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_finished_checkpoint_raises_naming_it(saved, tmp_path, case):
    root, state = copy_of(saved, tmp_path)
    damage, message = DAMAGE[case]
    damage(os.path.join(root, "4"))
    ckpt = Checkpointer(root, save_every=2)
    step_dir = os.path.join(root, "4")
    # Never a silent fall back to step 2 or a fresh start: latest_step or restore raises.
    with pytest.raises(CheckpointError, match=f"{step_dir}: .*{message}"):
        step = ckpt.latest_step()
        assert step == 4
        ckpt.restore(step, abstract(state))
    # The older, intact step still restores once the user chooses it.
    restored, _ = ckpt.restore(2, abstract(state))
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    ckpt.close()


def test_truncated_array_values_raise_on_restore(tmp_path):
    # Large enough that the values live in their own file, apart from the tree metadata.
    state = {"w": jnp.arange(256 * 256, dtype=jnp.float32).reshape(256, 256)}  # [256, 256]
    root = tmp_path / "run"
    with Checkpointer(root, save_every=1) as ckpt:
        ckpt.save(1, state, {})
    files = glob.glob(f"{root}/1/state/**/d/*", recursive=True)
    values = max(files, key=os.path.getsize)
    assert os.path.getsize(values) > 256 * 256  # the array's chunk, not metadata
    with open(values, "r+b") as f:
        f.truncate(os.path.getsize(values) // 2)
    with Checkpointer(root, save_every=1) as ckpt:
        assert ckpt.latest_step() == 1  # finished, then damaged: found, and then refused
        with pytest.raises(CheckpointError, match=f"{root}/1: cannot be restored .*read"):
            ckpt.restore(1, abstract(state))


def test_tree_mismatch_names_the_keys_and_shapes(saved, tmp_path):
    root, state = copy_of(saved, tmp_path)
    ckpt = Checkpointer(root, save_every=2)
    target = abstract(state)
    target["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
    del target["rng"]
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: params/extra;.*: rng"):
        ckpt.restore(4, target)
    target = abstract(state)
    target["params"]["b"] = jax.ShapeDtypeStruct((5,), jnp.bfloat16)
    with pytest.raises(CheckpointError, match=r"4: .*params/b \(3,\) vs \(5,\)"):
        ckpt.restore(4, target)
    with pytest.raises(CheckpointError, match=r"run/9: no such checkpoint .*\[2, 4\]"):
        ckpt.restore(9, abstract(state))
    ckpt.close()


def test_bad_inputs_are_value_errors(tmp_path):
    ckpt = Checkpointer(tmp_path / "run", save_every=1)
    with pytest.raises(ValueError, match="state leaf rng is a typed PRNG key"):
        ckpt.save(1, {"rng": jax.random.key(0)}, {})
    with pytest.raises(ValueError, match="data must be JSON-serialisable"):
        ckpt.save(1, {"x": jnp.ones(2)}, {"bad": object()})
    with pytest.raises(ValueError, match="save_every must be a positive int"):
        Checkpointer(tmp_path / "other", save_every=0)
    ckpt.close()
