"""Hugging Face checkpoints: config.json + *.safetensors in, the same format out.

Loading is a table from our parameter paths to HF tensor names and a layout change
(HF stores projections as [out, in]; we keep heads as their own axis). Each weight is
placed on the mesh with `jax.make_array_from_callback`, which asks for one device shard
at a time and is answered from a memory map.

`load_model` reads causal LMs and names a sequence classifier (a reward model) given to it;
`load_trunk` reads the decoder stack of either and hands back the tensors it did not use,
so a task head (align/reward_model.py's `score.weight`) is loaded by its owner.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from tandem.model.config import ModelConfig, from_hf_config, to_hf_config
from tandem.model.safetensors_io import CheckpointError, read_safetensors, write_safetensors
from tandem.model.sharding import named_sharding
from tandem.model.transformer import Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some exporters write that carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
LM_HEAD = "lm_head.weight"
SCORE_WEIGHT = "score.weight"  # the head of HF's *ForSequenceClassification: [num_labels, D]


def read_hf_config(model_dir: str) -> dict:
    """config.json of a checkpoint directory, parsed; errors name the directory or the file."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: no such checkpoint directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (a checkpoint directory needs config.json)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None


def load_config(model_dir: str) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    hf = read_hf_config(model_dir)
    try:
        return from_hf_config(hf, where=path)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e}") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def tensor_files(model_dir: str) -> dict[str, str]:
    """HF tensor name -> the file that holds it (sharded index or a single file)."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
        return {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return {name: single for name in read_safetensors(single)}
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(model_dir)):
        raise CheckpointError(
            f"{model_dir}: only pickle weights (*.bin/*.pt) found; tandem "
            f"loads safetensors only (convert with `save_pretrained(..., "
            f"safe_serialization=True)`)"
        )
    raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


# Layout changes, HF -> ours, as numpy views (no copies until a shard is sliced).
def _qkv(n):  # [n*H, D] -> [D, n, H]
    return lambda w: w.reshape(n, -1, w.shape[-1]).transpose(2, 0, 1)


def _o(n):  # [D, N*H] -> [N, H, D]
    return lambda w: w.reshape(w.shape[0], n, -1).transpose(1, 2, 0)


def _bias(n):  # [n*H] -> [n, H]
    return lambda w: w.reshape(n, -1)


def _same(w):
    return w


def _t(w):
    return w.T


# Ours -> HF for saving: [D, n, H] -> [n*H, D] and so on.
def _qkv_back(w):
    return w.transpose(1, 2, 0).reshape(-1, w.shape[0])


def _o_back(w):
    return w.transpose(2, 0, 1).reshape(w.shape[2], -1)


def _bias_back(w):
    return w.reshape(-1)


def weight_table(cfg: ModelConfig) -> dict[tuple, tuple[str, Callable, Callable]]:
    """Our parameter path -> (HF tensor name, HF->ours view, ours->HF)."""
    n, k = cfg.num_heads, cfg.num_kv_heads
    table = {
        ("embed",): ("model.embed_tokens.weight", _same, _same),
        ("norm", "scale"): ("model.norm.weight", _same, _same),
    }
    if not cfg.tie_word_embeddings:
        table[("lm_head",)] = (LM_HEAD, _t, _t)
    for i in range(cfg.num_layers):
        hf = f"model.layers.{i}."
        ours = ("layers", i)
        table[ours + ("input_norm", "scale")] = (hf + "input_layernorm.weight", _same, _same)
        table[ours + ("post_attn_norm", "scale")] = (
            hf + "post_attention_layernorm.weight",
            _same,
            _same,
        )
        for name, heads in (("q", n), ("k", k), ("v", k)):
            table[ours + ("attn", f"{name}_proj")] = (
                hf + f"self_attn.{name}_proj.weight",
                _qkv(heads),
                _qkv_back,
            )
            if cfg.qkv_bias:
                table[ours + ("attn", f"{name}_bias")] = (
                    hf + f"self_attn.{name}_proj.bias",
                    _bias(heads),
                    _bias_back,
                )
        table[ours + ("attn", "o_proj")] = (hf + "self_attn.o_proj.weight", _o(n), _o_back)
        if cfg.qk_norm:
            table[ours + ("attn", "q_norm", "scale")] = (
                hf + "self_attn.q_norm.weight",
                _same,
                _same,
            )
            table[ours + ("attn", "k_norm", "scale")] = (
                hf + "self_attn.k_norm.weight",
                _same,
                _same,
            )
        for name in ("gate", "up", "down"):
            table[ours + ("mlp", f"{name}_proj")] = (hf + f"mlp.{name}_proj.weight", _t, _t)
    return table


def _np_dtype(dtype):
    return ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def load_model(
    model_dir: str, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, rules=None
) -> Transformer:
    """Loads an HF causal-LM checkpoint directory into a Transformer, placed on `mesh` if
    given. Every tensor must find a place (a tied model may still carry lm_head.weight)."""
    cfg = load_config(model_dir)
    files = tensor_files(model_dir)
    _check_causal_lm(model_dir, files)
    model, unused = _fill(model_dir, cfg, files, dtype=dtype, mesh=mesh, rules=rules)
    if cfg.tie_word_embeddings:
        unused.pop(LM_HEAD, None)
    if unused:
        raise CheckpointError(
            f"{model_dir}: tensors the model has no place for: "
            f"{sorted(unused)[:5]}{' ...' if len(unused) > 5 else ''} "
            f"(does config.json match the weights?)"
        )
    return model


def load_trunk(
    model_dir: str, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, rules=None
) -> tuple[Transformer, dict[str, tuple[np.ndarray, str]]]:
    """The decoder stack of any HF checkpoint of a supported family, without an LM head, and
    the tensors it has no place for (a task head such as `score.weight`, an untied
    `lm_head.weight`) as name -> (memory-mapped array, the file that holds it)."""
    cfg = load_config(model_dir).replace(tie_word_embeddings=True)  # no lm_head parameter
    files = tensor_files(model_dir)
    return _fill(model_dir, cfg, files, dtype=dtype, mesh=mesh, rules=rules)


def _check_causal_lm(model_dir: str, files: dict[str, str]) -> None:
    """A sequence classifier (a reward model) has the same trunk as a causal LM; name it
    rather than fail on its head."""
    architectures = read_hf_config(model_dir).get("architectures") or []
    classifiers = [a for a in architectures if a.endswith("ForSequenceClassification")]
    if not classifiers and SCORE_WEIGHT not in files:
        return
    kind = classifiers[0] if classifiers else f"its head is {SCORE_WEIGHT!r}"
    raise CheckpointError(
        f"{model_dir}: a sequence classifier ({kind}), i.e. a reward model, not a causal LM; "
        f"serving and policy training need a *ForCausalLM checkpoint (a reward model scores "
        f"RL rollouts: set `reward_model` in the GRPO/PPO config)"
    )


def _fill(
    model_dir: str, cfg: ModelConfig, files: dict[str, str], *, dtype, mesh, rules
) -> tuple[Transformer, dict[str, tuple[np.ndarray, str]]]:
    """A Transformer of `cfg` with every parameter read from its HF tensor, shape-checked and
    placed (on `mesh` by logical axes, else on the first device); and the tensors unused."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    table = weight_table(cfg)
    opened: dict[str, dict[str, np.ndarray]] = {}
    target = _np_dtype(dtype)

    def read(name: str) -> tuple[np.ndarray, str]:
        if name not in files:
            raise CheckpointError(f"{model_dir}: tensor {name!r} is missing from the checkpoint")
        path = files[name]
        if path not in opened:
            opened[path] = read_safetensors(path)
        if name not in opened[path]:
            raise CheckpointError(f"{path}: tensor {name!r} listed in the index is not in the file")
        return opened[path][name], path

    used = set()
    flat = dict(nnx.to_flat_state(abs_state))
    for path_key, variable in flat.items():
        if path_key not in table:
            raise CheckpointError(f"internal: no HF name for parameter {path_key}")
        hf_name, to_ours, _ = table[path_key]
        raw, file = read(hf_name)
        used.add(hf_name)
        shape = variable.shape
        try:
            view = to_ours(raw)
        except ValueError:  # a reshape that the tensor's size does not allow
            view = None
        if view is None or view.shape != shape:
            raise CheckpointError(
                f"{file}: tensor {hf_name!r} has shape {tuple(raw.shape)}, which does not fit "
                f"the model's {path_key} of shape {shape} (config.json disagrees with the "
                f"weights)"
            )
        axes = variable.get_metadata().get("logical_axes")
        sharding = (
            named_sharding(mesh, axes, shape, rules)
            if mesh is not None
            else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
        value = jax.make_array_from_callback(
            shape, sharding, lambda idx, v=view: np.ascontiguousarray(v[idx]).astype(target)
        )
        flat[path_key] = variable.replace(value)
    unused = {
        name: read(name)
        for name in files
        if name not in used and not name.endswith(IGNORED_SUFFIXES)
    }
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), unused


def save_model(
    model: Transformer, model_dir: str, *, dtype=None, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Writes config.json and safetensors (sharded with an index past `max_shard_bytes`)."""
    cfg = model.config
    os.makedirs(model_dir, exist_ok=True)
    table = weight_table(cfg)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for path_key, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        hf_name, _, to_hf = table[path_key]
        value = np.asarray(jax.device_get(variable[...]))
        if dtype is not None:
            value = value.astype(_np_dtype(dtype))
        tensor = np.ascontiguousarray(to_hf(value))
        if size and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][hf_name] = tensor
        size += tensor.nbytes
    if len(shards) == 1:
        write_safetensors(os.path.join(model_dir, SINGLE_FILE), shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(model_dir, file), shard)
            weight_map.update({name: file for name in shard})
        total = sum(t.nbytes for s in shards for t in s.values())
        with open(os.path.join(model_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf = to_hf_config(cfg)
    hf["torch_dtype"] = str(jnp.dtype(dtype or model.embed[...].dtype))
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
