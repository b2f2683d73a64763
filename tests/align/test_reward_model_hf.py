"""Reward models on disk are Hugging Face sequence classifiers (what TRL's RewardTrainer
writes): transformers scores a tandem reward model as tandem does, and tandem scores one that
transformers wrote as transformers does (torch, fp32, CPU, nothing downloaded).

Every weight is randomised (HF initialises norms to 1 and would hide a misplaced norm), so
scores are ~1 in magnitude; parity is held to 1e-4 absolute, as in tests/model/test_hf.py.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tandem.align.reward_model import (
    SCORE_FILE,
    RewardModel,
    RewardModelScorer,
    load_reward_model,
    save_reward_model,
)
from tandem.model.config import ModelConfig
from tandem.model.hf import save_model
from tandem.model.safetensors_io import CheckpointError, write_safetensors
from tandem.model.tokenizer import byte_tokenizer
from tandem.model.transformer import Transformer

ATOL = 1e-4
VOCAB = 260  # the byte tokenizer's 259 tokens, and one spare
PAD = byte_tokenizer().pad_token_id  # never inside a row, so HF finds each row's end
LENGTHS = (3, 11, 16)  # right-padded to 16
TINY = dict(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
HF_CONFIGS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}


def right_padded_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens i32[B, T] with PAD after each row's length, lengths i32[B])."""
    rng = np.random.default_rng(seed)
    lengths = np.array(LENGTHS, np.int32)
    tokens = rng.integers(0, PAD, (len(lengths), max(lengths))).astype(np.int32)
    tokens[np.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = PAD
    return tokens, lengths


def tandem_scores(model: RewardModel, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens), jnp.asarray(lengths - 1)))


def hf_scores(model_dir: str, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """transformers' scores, after checking that every tensor found its place."""
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    with torch.no_grad():
        out = model.eval()(torch.as_tensor(tokens).long(), attention_mask=torch.as_tensor(mask))
    return out.logits[:, 0].numpy()


def random_reward_model(model_type: str, seed: int = 0) -> RewardModel:
    """A tandem reward model with every weight drawn afresh (norms near 1)."""
    cfg = ModelConfig(vocab_size=VOCAB, num_layers=2, model_type=model_type, **TINY)
    model = RewardModel(Transformer(cfg, rngs=nnx.Rngs(seed)), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        noise = rng.standard_normal(var.shape, np.float32)
        value = 1 + 0.1 * noise if path[-1] == "scale" else 0.05 * noise
        flat.append((path, var.replace(jnp.asarray(value))))
    nnx.update(model, nnx.from_flat_state(flat))
    model.score[...] = 4 * model.score[...]  # scores ~1, so a 1e-4 match means something
    return model


def save_hf_reward_model(path, model_type: str = "llama", num_labels: int = 1) -> str:
    """A sequence classifier written by transformers itself, as TRL's RewardTrainer saves one."""
    config = HF_CONFIGS[model_type](
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        num_labels=num_labels,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(
                1 + 0.1 * noise if "norm" in name else (0.2 if "score" in name else 0.05) * noise
            )
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_tandem_reward_model_scores_the_same_in_transformers(tmp_path, model_type):
    model = random_reward_model(model_type)
    save_reward_model(model, byte_tokenizer(), str(tmp_path))
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["architectures"] == [
        f"{'Llama' if model_type == 'llama' else 'Qwen2'}ForSequenceClassification"
    ]
    assert (hf["num_labels"], hf["id2label"], hf["pad_token_id"]) == (1, {"0": "LABEL_0"}, PAD)
    tokens, lengths = right_padded_batch()
    expected = tandem_scores(model, tokens, lengths)
    assert np.abs(expected).max() > 0.3  # scores are not all ~0
    np.testing.assert_allclose(hf_scores(str(tmp_path), tokens, lengths), expected, atol=ATOL)
    # And back: tandem reads its own checkpoint bit for bit.
    loaded = load_reward_model(str(tmp_path))
    np.testing.assert_array_equal(tandem_scores(loaded, tokens, lengths), expected)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_transformers_reward_model_scores_the_same_in_tandem(tmp_path, model_type):
    path = save_hf_reward_model(tmp_path, model_type)
    tokens, lengths = right_padded_batch(seed=1)
    expected = hf_scores(path, tokens, lengths)
    assert np.abs(expected).max() > 0.3
    got = tandem_scores(load_reward_model(path), tokens, lengths)
    np.testing.assert_allclose(got, expected, atol=ATOL)


def test_scorer_on_a_saved_model_matches_transformers_on_the_text(tmp_path):
    """RL's reward function: prompt + completion, encoded without special tokens (TRL's
    GRPO does the same), scored at its last token."""
    save_reward_model(random_reward_model("llama"), byte_tokenizer(), str(tmp_path))
    prompts = ["2+2=", "Say hi:", "x"]
    completions = ["4", " hello there, how are you", ""]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    scorer = RewardModelScorer(load_reward_model(str(tmp_path)), tokenizer)
    got = scorer(prompts, completions)
    encoded = tokenizer(
        [p + c for p, c in zip(prompts, completions)],
        add_special_tokens=False,
        padding=True,
        return_tensors="np",
    )
    lengths = encoded["attention_mask"].sum(-1)
    assert len(set(lengths)) == len(prompts)  # the batch really is padded
    np.testing.assert_allclose(
        got, hf_scores(str(tmp_path), encoded["input_ids"], lengths), atol=ATOL
    )


def test_earlier_layout_still_loads(tmp_path):
    """Runs saved before the HF layout: a tied causal LM plus score.safetensors."""
    model = random_reward_model("llama")
    save_model(model.trunk, str(tmp_path))
    write_safetensors(
        os.path.join(tmp_path, SCORE_FILE), {"score": np.asarray(jax.device_get(model.score[...]))}
    )
    tokens, lengths = right_padded_batch()
    np.testing.assert_array_equal(
        tandem_scores(load_reward_model(str(tmp_path)), tokens, lengths),
        tandem_scores(model, tokens, lengths),
    )


def test_a_checkpoint_that_is_not_a_reward_model_is_named(tmp_path):
    lm_dir = str(tmp_path / "lm")
    save_model(random_reward_model("llama").trunk, lm_dir)
    with pytest.raises(CheckpointError, match=r"lm: tensor 'score.weight' is missing"):
        load_reward_model(lm_dir)
    two_labels = save_hf_reward_model(tmp_path / "two", num_labels=2)
    with pytest.raises(CheckpointError, match=r"two/config.json: num_labels is 2"):
        load_reward_model(two_labels)


def test_serving_a_reward_model_says_what_it_is(tmp_path, monkeypatch, capsys):
    """`tandem serve RUN_DIR/hf` of a reward-model run fails before any server starts, and
    says why, instead of "no place for score.weight"."""
    import uvicorn

    from tandem.cli.main import main

    save_reward_model(random_reward_model("llama"), byte_tokenizer(), str(tmp_path))

    def never(*args, **kwargs):
        raise AssertionError("a reward model was served")

    monkeypatch.setattr(uvicorn, "run", never)
    assert main(["serve", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "a sequence classifier (LlamaForSequenceClassification), i.e. a reward model" in error
    assert "serving and policy training need a *ForCausalLM checkpoint" in error
