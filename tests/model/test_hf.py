"""Hugging Face checkpoints: tandem's logits equal transformers' (torch, fp32) both ways.

The references are tiny checkpoints, one per family we serve, written by transformers
itself (so config.json and tensor names are exactly what HF writes) with every parameter
randomised: HF initialises biases to 0 and norms to 1, which would hide a dropped bias or
a misplaced norm. fp32 parity is held to 1e-4 absolute on logits of magnitude ~1.5
(observed ~1e-6).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from tandem.model.hf import (
    INDEX_FILE,
    SINGLE_FILE,
    load_config,
    load_model,
    load_trunk,
    save_model,
)
from tandem.model.safetensors_io import CheckpointError
from tandem.model.transformer import Transformer, segment_positions

ATOL = 1e-4
# bf16 keeps 8 mantissa bits (2^-8 ~ 0.4% per rounding); through two layers the logits
# (|x| ~ 1.5) move by <= 0.02 in practice. 0.05 is ~3% of their range.
BF16_ATOL = 5e-2

VOCAB = 160
PROMPT_LENGTHS = (1, 7, 33)
SLIDING_WINDOW = 8  # < the longest prompt, so the window changes the logits

_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)


@dataclasses.dataclass(frozen=True)
class Family:
    config_class: type
    hf_kwargs: dict
    expected: dict
    """ModelConfig fields `load_config` must produce: proof the checkpoint exercises
    the feature the family is here for."""


FAMILIES = {
    # Llama 2: default rope, untied head, multi-head attention (K == N).
    "llama2": Family(
        transformers.LlamaConfig,
        dict(_TINY, num_key_value_heads=4),
        dict(rope_type="default", tie_word_embeddings=False, num_kv_heads=4),
    ),
    # Llama 3.1: llama3 rope scaling. theta 1e4, head_dim 16 and original_max 32 put the
    # rotary wavelengths (6.3, 20, 63, ...) in all three bands: kept, smoothed, scaled.
    "llama3.1": Family(
        transformers.LlamaConfig,
        dict(
            _TINY,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
        dict(rope_type="llama3", rope_factor=8.0, rope_original_max_position=32),
    ),
    # Llama 3.2: llama3 rope with tied embeddings.
    "llama3.2": Family(
        transformers.LlamaConfig,
        dict(
            _TINY,
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
        dict(rope_type="llama3", tie_word_embeddings=True),
    ),
    "mistral": Family(
        transformers.MistralConfig,
        dict(_TINY, sliding_window=SLIDING_WINDOW),
        dict(sliding_window=SLIDING_WINDOW),
    ),
    "qwen2": Family(
        transformers.Qwen2Config,
        dict(_TINY, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
        dict(qkv_bias=True, qk_norm=False, sliding_window=None, rope_theta=1e6),
    ),
    # Qwen3: q/k RMSNorm, tied, multi-query (K == 1), head_dim != hidden / heads.
    "qwen3": Family(
        transformers.Qwen3Config,
        dict(_TINY, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True),
        dict(qkv_bias=False, qk_norm=True, num_kv_heads=1, head_dim=32),
    ),
}


@dataclasses.dataclass(frozen=True)
class HFReference:
    name: str
    path: str
    """A `save_pretrained` directory: config.json + model.safetensors."""
    prompts: list[np.ndarray]
    """i32[T] token ids, one per PROMPT_LENGTHS."""
    logits: list[np.ndarray]
    """f32[T, V] torch logits (fp32, eager attention) for each prompt."""


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Norm weights ~ N(1, 0.1), every other parameter (biases too) ~ N(0, 0.05)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.05 * noise)


def torch_logits(model: transformers.PreTrainedModel, prompt: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(prompt)[None]).logits[0].float().numpy()


def load_torch(path: str, **overrides) -> transformers.PreTrainedModel:
    # Eager attention: the reference path that applies every mask (sliding window included).
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **overrides
    ).eval()


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """name -> HFReference, built on first use and shared by the module."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, n).astype(np.int32) for n in PROMPT_LENGTHS]

    @functools.cache
    def build(name: str) -> HFReference:
        family = FAMILIES[name]
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            family.config_class(**family.hf_kwargs),
            dtype=torch.float32,
            attn_implementation="eager",
        ).eval()
        randomize_(model, seed=sorted(FAMILIES).index(name))
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        logits = [torch_logits(model, p) for p in prompts]
        return HFReference(name, path, prompts, logits)

    return build


@nnx.jit
def forward(model: Transformer, tokens: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    # Jitted: one compile per (family, length) costs far less than eager op-by-op.
    return model(tokens, segment_ids=segment_ids)


def tandem_logits(model: Transformer, prompt: np.ndarray) -> np.ndarray:  # [T] -> f32[T, V]
    return np.asarray(forward(model, jnp.asarray(prompt)[None], None))[0]


def params(model: Transformer) -> dict[tuple, np.ndarray]:
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def random_tandem(model_dir: str, seed: int) -> Transformer:
    """A tandem model with `model_dir`'s config and every weight drawn afresh (norms near 1)."""
    model = load_model(model_dir)
    rng = np.random.default_rng(seed)
    # Committed to the device like load_model's arrays, so `forward` reuses its compile.
    device = jax.devices()[0]
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        noise = rng.standard_normal(var.shape, np.float32)
        value = 1 + 0.1 * noise if path[-1] == "scale" else 0.05 * noise
        flat.append((path, var.replace(jax.device_put(value, device))))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


# --- HF -> tandem ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_config_maps_family_features(hf_reference, name):
    cfg = load_config(hf_reference(name).path)
    for field, value in FAMILIES[name].expected.items():
        assert getattr(cfg, field) == value, field


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(hf_reference, name):
    ref = hf_reference(name)
    model = load_model(ref.path)
    for prompt, expected in zip(ref.prompts, ref.logits, strict=True):
        np.testing.assert_allclose(tandem_logits(model, prompt), expected, atol=ATOL, rtol=0)


def test_mistral_sliding_window_is_applied_by_transformers(hf_reference):
    """The Mistral reference really is windowed: without the window HF's logits change,
    but only at positions that see more than SLIDING_WINDOW keys."""
    ref = hf_reference("mistral")
    full = load_torch(ref.path, sliding_window=None)
    assert full.config.sliding_window is None
    prompt, windowed = ref.prompts[-1], ref.logits[-1]
    assert len(prompt) > SLIDING_WINDOW
    unwindowed = torch_logits(full, prompt)
    np.testing.assert_allclose(
        unwindowed[:SLIDING_WINDOW], windowed[:SLIDING_WINDOW], atol=ATOL, rtol=0
    )
    assert np.abs(unwindowed[SLIDING_WINDOW:] - windowed[SLIDING_WINDOW:]).max() > 100 * ATOL


def test_v4_rope_scaling_config_reads_the_same(hf_reference, tmp_path):
    """Checkpoints on the Hub carry transformers v4's `rope_theta` + `rope_scaling`
    (with either `rope_type` or the older `type`), not v5's `rope_parameters`."""
    path = hf_reference("llama3.1").path
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    rope = hf.pop("rope_parameters")
    for type_key in ("rope_type", "type"):
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
        v4 = dict(hf, rope_theta=rope["rope_theta"], rope_scaling={type_key: "llama3", **scaling})
        (tmp_path / "config.json").write_text(json.dumps(v4))
        assert load_config(str(tmp_path)) == load_config(path)


@pytest.mark.parametrize("name", ["llama3.1", "qwen3"])
def test_bf16_load_is_close_to_fp32(hf_reference, name):
    ref = hf_reference(name)
    fp32, bf16 = load_model(ref.path), load_model(ref.path, dtype=jnp.bfloat16)
    assert {v.dtype for v in params(bf16).values()} == {jnp.dtype(jnp.bfloat16)}
    prompt = ref.prompts[-1]
    got = tandem_logits(bf16, prompt)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, tandem_logits(fp32, prompt), atol=BF16_ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_segments_equal_separate_sequences(hf_reference, name):
    """Two sequences packed in one row (plus padding, segment 0) give each sequence's own
    logits: attention stays inside a segment. (Rope only sees position differences, so the
    logits cannot tell whether positions restart; the next test checks that directly.)"""
    ref = hf_reference(name)
    model = load_model(ref.path)
    a, b = ref.prompts[1], ref.prompts[2]
    tokens = np.concatenate([a, b, [0, 0, 0]])[None]
    segment_ids = np.array([[1] * len(a) + [2] * len(b) + [0] * 3])
    packed = np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(segment_ids)))[0]
    np.testing.assert_allclose(packed[: len(a)], tandem_logits(model, a), atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[len(a) : -3], tandem_logits(model, b), atol=1e-5, rtol=0)


def test_packed_positions_restart_per_segment():
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]])
    expected = [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]
    np.testing.assert_array_equal(segment_positions(segment_ids), expected)


def test_trunk_hands_back_the_head_it_has_no_place_for(hf_reference):
    """load_trunk (the reward model's loader) reads the same weights as load_model, minus the
    LM head, which it returns unused, as stored ([V, D]), with its file."""
    ref = hf_reference("llama2")  # untied: lm_head.weight is a tensor of its own
    trunk, unused = load_trunk(ref.path)
    lm = params(load_model(ref.path))
    assert trunk.lm_head is None and list(unused) == ["lm_head.weight"]
    head, file = unused["lm_head.weight"]
    assert file == os.path.join(ref.path, SINGLE_FILE)
    np.testing.assert_array_equal(head.T, lm[("lm_head",)])
    got = params(trunk)
    assert got.keys() == lm.keys() - {("lm_head",)}
    for key, value in got.items():
        np.testing.assert_array_equal(value, lm[key], err_msg=str(key))


# --- tandem -> HF ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_model_loads_in_transformers(hf_reference, tmp_path, name):
    """Fresh random weights (not the HF reference's), so saving is tested on its own."""
    ref = hf_reference(name)
    model = random_tandem(ref.path, seed=len(name))
    save_model(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", SINGLE_FILE]
    hf = load_torch(str(tmp_path))
    for prompt in ref.prompts:
        ours = tandem_logits(model, prompt)
        np.testing.assert_allclose(torch_logits(hf, prompt), ours, atol=ATOL, rtol=0)
    # And back: a fp32 round trip is bit-exact.
    reloaded = params(load_model(str(tmp_path)))
    original = params(model)
    assert reloaded.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(reloaded[key], value, err_msg=str(key))


@pytest.mark.parametrize("name", ["qwen2", "llama3.2"])
def test_sharded_save_loads_in_tandem_and_transformers(hf_reference, tmp_path, name):
    ref = hf_reference(name)
    model = random_tandem(ref.path, seed=3)
    max_shard_bytes = 40_000  # the largest tensor (embed, 160 x 64 f32) is 40,960 bytes
    save_model(model, str(tmp_path), max_shard_bytes=max_shard_bytes)

    assert not (tmp_path / SINGLE_FILE).exists()
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    shard_files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shard_files) >= 3
    assert set(weight_map.values()) == set(shard_files)
    for file in shard_files:
        tensors = safetensors.numpy.load_file(str(tmp_path / file))
        assert {n for n, f in weight_map.items() if f == file} == tensors.keys()
        # A shard only exceeds the cap when it holds a single tensor that does.
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= max_shard_bytes

    ours = load_model(str(tmp_path))
    hf = load_torch(str(tmp_path))
    for prompt in ref.prompts:
        expected = tandem_logits(model, prompt)
        np.testing.assert_allclose(tandem_logits(ours, prompt), expected, atol=ATOL, rtol=0)
        np.testing.assert_allclose(torch_logits(hf, prompt), expected, atol=ATOL, rtol=0)


# --- errors name the file and the problem ---------------------------------------------------


def _edit_config(path, **changes):
    config = path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))


def _drop_config_key(path, key):
    config = path / "config.json"
    hf = json.loads(config.read_text())
    del hf[key]
    config.write_text(json.dumps(hf))


def _edit_tensors(path, edit):
    file = str(path / SINGLE_FILE)
    tensors = dict(safetensors.numpy.load_file(file))
    edit(tensors)
    safetensors.numpy.save_file(tensors, file)


def _truncate(path, keep):
    file = path / SINGLE_FILE
    data = file.read_bytes()
    file.write_bytes(data[: keep(len(data))])


def _pickle_only(path):
    (path / SINGLE_FILE).unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, path / "pytorch_model.bin")


K_PROJ = "model.layers.0.self_attn.k_proj.weight"
DOWN_PROJ = "model.layers.1.mlp.down_proj.weight"
ST = re.escape(SINGLE_FILE)

# case -> (edit of a copy of the qwen2 checkpoint, regex the message must match)
ERROR_CASES = {
    "missing_config": (lambda p: (p / "config.json").unlink(), r"config\.json: missing"),
    "invalid_json": (
        lambda p: (p / "config.json").write_text('{"model_type": "qwen2",'),
        r"config\.json: not valid JSON",
    ),
    "unknown_model_type": (
        lambda p: _edit_config(p, model_type="gpt2"),
        r"config\.json: unknown model_type 'gpt2'",
    ),
    "config_missing_key": (
        lambda p: _drop_config_key(p, "hidden_size"),
        r"config\.json: missing keys \['hidden_size'\]",
    ),
    "wrong_shape": (
        lambda p: _edit_tensors(p, lambda t: t.update({K_PROJ: t[K_PROJ][:24]})),
        rf"{ST}: tensor '{re.escape(K_PROJ)}' has shape \(24, 64\), which does not fit",
    ),
    "transposed": (
        lambda p: _edit_tensors(p, lambda t: t.update({DOWN_PROJ: t[DOWN_PROJ].T.copy()})),
        rf"{ST}: tensor '{re.escape(DOWN_PROJ)}' has shape \(128, 64\)",
    ),
    "missing_tensor": (
        lambda p: _edit_tensors(p, lambda t: t.pop(DOWN_PROJ)),
        rf"tensor '{re.escape(DOWN_PROJ)}' is missing from the checkpoint",
    ),
    "extra_tensor": (
        lambda p: _edit_tensors(p, lambda t: t.update({"model.layers.0.extra": t[K_PROJ]})),
        r"tensors the model has no place for: \['model\.layers\.0\.extra'\]",
    ),
    "pickle_only": (_pickle_only, r"only pickle weights \(\*\.bin/\*\.pt\) found"),
    "no_weights": (lambda p: (p / SINGLE_FILE).unlink(), rf"no {ST} or "),
    "truncated_in_length": (lambda p: _truncate(p, lambda n: 4), rf"{ST}: truncated"),
    "truncated_in_header": (lambda p: _truncate(p, lambda n: 64), rf"{ST}: truncated"),
    "truncated_in_data": (lambda p: _truncate(p, lambda n: n // 2), rf"{ST}: .*truncated"),
    "truncated_last_byte": (lambda p: _truncate(p, lambda n: n - 1), rf"{ST}: .*truncated"),
}


@pytest.fixture
def checkpoint_copy(hf_reference, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(hf_reference("qwen2").path, path)
    return path


@pytest.mark.parametrize("case", ERROR_CASES)
def test_broken_checkpoint_error_names_file_and_problem(checkpoint_copy, case):
    edit, message = ERROR_CASES[case]
    edit(checkpoint_copy)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(str(checkpoint_copy))
    assert str(checkpoint_copy) in str(info.value)


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(missing))}: no such checkpoint"):
        load_model(str(missing))


@pytest.fixture
def sharded_copy(hf_reference, tmp_path):
    path = tmp_path / "sharded"
    save_model(load_model(hf_reference("qwen2").path), str(path), max_shard_bytes=40_000)
    return path


def test_sharded_missing_shard_names_it(sharded_copy):
    shard = sorted(f for f in os.listdir(sharded_copy) if f.endswith(".safetensors"))[1]
    (sharded_copy / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard)}: no such file"):
        load_model(str(sharded_copy))


def test_sharded_index_lists_tensor_absent_from_its_shard(sharded_copy):
    index = json.loads((sharded_copy / INDEX_FILE).read_text())
    shard = index["weight_map"][DOWN_PROJ]
    assert index["weight_map"][K_PROJ] != shard
    index["weight_map"][K_PROJ] = shard
    (sharded_copy / INDEX_FILE).write_text(json.dumps(index))
    message = rf"{re.escape(shard)}: tensor '{re.escape(K_PROJ)}' listed in the index is not"
    with pytest.raises(CheckpointError, match=message):
        load_model(str(sharded_copy))


def test_sharded_malformed_index(sharded_copy):
    (sharded_copy / INDEX_FILE).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=rf"{re.escape(INDEX_FILE)}: malformed index"):
        load_model(str(sharded_copy))


def _drop_architectures(path):
    _drop_config_key(path, "architectures")


@pytest.mark.parametrize(
    "edit, named",
    [(None, r"\(Qwen2ForSequenceClassification\)"), (_drop_architectures, r"\(its head is 'score")],
    ids=["architectures", "score_tensor_only"],
)
def test_sequence_classifier_is_named_not_served(tmp_path, edit, named):
    """A reward model (what TRL's RewardTrainer saves) has a causal LM's trunk; the causal-LM
    loader says what it is instead of failing on its `score.weight` head."""
    config = transformers.Qwen2Config(**_TINY, num_labels=1)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    if edit:
        edit(tmp_path)
    message = rf"{re.escape(str(tmp_path))}: a sequence classifier {named}.*reward model, not a "
    message += r"causal LM; serving and policy training need a \*ForCausalLM checkpoint"
    with pytest.raises(CheckpointError, match=message):
        load_model(str(tmp_path))
