"""model/loading.py: what a source names, --dtype auto, the byte tokenizer's vocabulary
check, and a checkpoint loading back what random weights saved."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from tandem.model import ModelConfig
from tandem.model.hf import save_model
from tandem.model.loading import config_for, is_checkpoint, load, resolve_dtype


def test_a_source_is_a_checkpoint_directory_or_a_gin_preset(tmp_path):
    assert is_checkpoint(str(tmp_path))
    for preset in ("tiny", "models/tiny.gin", "anything.gin"):
        assert not is_checkpoint(preset)
    gin_file = tmp_path / "my_model"  # a gin file on disk, whatever its name
    gin_file.write_text("ModelConfig.num_layers = 1\n")
    assert not is_checkpoint(str(gin_file))
    # Anything else is named as the checkpoint directory it was meant to be.
    for missing in ("/nonexistent/ckpt", "Qwen2.5-0.5B"):
        with pytest.raises(FileNotFoundError, match=f"{missing}: no such checkpoint directory"):
            config_for(missing)


def test_dtype_auto_takes_the_checkpoints_own(tmp_path):
    for key, stored in (("torch_dtype", "bfloat16"), ("dtype", "float16"), ("dtype", "float32")):
        (tmp_path / "config.json").write_text(json.dumps({key: stored}))
        assert resolve_dtype("auto", str(tmp_path)) == stored
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "int8"}))
    with pytest.raises(ValueError, match="config.json: unsupported dtype 'int8'"):
        resolve_dtype("auto", str(tmp_path))
    assert resolve_dtype("bfloat16", str(tmp_path)) == "bfloat16"  # an explicit choice wins


def test_dtype_auto_for_a_preset_is_float32_on_a_cpu_and_bad_names_are_refused():
    assert jax.default_backend() == "cpu"
    assert resolve_dtype("auto", "models/tiny.gin") == "float32"
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", "models/tiny.gin")


def test_random_weights_need_room_for_the_byte_tokenizer():
    """The byte tokenizer has 256 bytes + 3 special tokens = 259 ids; refused before any
    weights are built."""
    small = ModelConfig(
        vocab_size=258,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
    )
    with pytest.raises(ValueError, match=r"vocab_size \(258\) is smaller than .* 259 tokens"):
        load(small)


def test_a_checkpoint_loads_what_random_weights_saved(tmp_path):
    model, tokenizer, name = load("tiny", seed=3)
    assert (name, len(tokenizer), model.config) == ("tiny", 259, config_for("tiny"))
    path = tmp_path / "my-ckpt"
    save_model(model, str(path))
    tokenizer.save_pretrained(path)
    loaded, reloaded_tokenizer, name = load(str(path))
    assert name == "my-ckpt"
    assert reloaded_tokenizer.encode("hi") == tokenizer.encode("hi")
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))):
        np.testing.assert_array_equal(a, b)
