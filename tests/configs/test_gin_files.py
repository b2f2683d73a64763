"""Every packaged gin file parses strictly; presets carry the published shapes."""

from __future__ import annotations

import os

import gin
import pytest

# train/*.gin bind align's configurables, which register when imported (`tandem train`
# imports them before it parses; configs/ imports nothing of align).
import tandem.align.algo_configs  # noqa: F401
import tandem.align.train_config  # noqa: F401
from tandem import configs
from tandem.model.config import ModelConfig, from_hf_config, to_hf_config

GIN_FILES = configs.gin_files()
MODEL_FILES = [f for f in GIN_FILES if os.sep + "models" + os.sep in f]


def _rel(path: str) -> str:
    return os.path.relpath(path, configs.CONFIG_DIR)


@pytest.fixture(autouse=True)
def clean_gin():
    """Gin config is process-global; no binding may leak into or out of a test."""
    gin.clear_config()
    yield
    gin.clear_config()


def test_finds_the_packaged_files():
    names = {_rel(f) for f in GIN_FILES}
    assert {"models/tiny.gin", "models/llama3.2-1b.gin", "sharding/fsdp_tp.gin"} <= names


@pytest.mark.parametrize("path", GIN_FILES, ids=_rel)
def test_every_gin_file_parses_strictly(path):
    configs.parse([path])
    if path in MODEL_FILES:
        cfg = ModelConfig()
        # The preset survives the Hugging Face mapping unchanged: it says nothing that a
        # config.json of its family cannot.
        assert from_hf_config(to_hf_config(cfg)) == cfg


def test_sharding_file_spells_out_the_default_rules():
    from tandem.model.sharding import LOGICAL_RULES, logical_rules

    configs.parse([configs.config_path("sharding/fsdp_tp.gin")])
    assert logical_rules() == LOGICAL_RULES
    assert gin.query_parameter("make_mesh.tensor") == 2
    assert gin.query_parameter("make_mesh.fsdp") == -1


# Published sizes (model cards). The exact counts from ModelConfig.num_params, embeddings
# and the untied LM head included, are in the comments; all land within 1% of the card.
PUBLISHED_PARAMS = {
    "llama3.2-1b": 1.24e9,  # 1_235_814_400 (tied)
    "llama3.1-8b": 8.03e9,  # 8_030_261_248
    "qwen2.5-0.5b": 0.49e9,  # 494_032_768 (tied)
    "qwen2.5-7b": 7.61e9,  # 7_615_616_512
    "qwen3-0.6b": 0.6e9,  # 596_049_920 (tied; 0.44e9 without the embedding table)
    "qwen3-8b": 8.19e9,  # 8_190_735_360
    "mistral-7b": 7.25e9,  # 7_248_023_552
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_size_matches_the_model_card(name):
    cfg = configs.model_config_from_gin(name)
    assert cfg.num_params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)


def test_model_config_from_gin_accepts_path_packaged_name_and_preset():
    by_path = configs.model_config_from_gin(configs.config_path("models/tiny.gin"))
    by_name = configs.model_config_from_gin("models/tiny.gin")
    by_preset = configs.model_config_from_gin("tiny")
    assert by_path == by_name == by_preset
    assert (by_preset.vocab_size, by_preset.num_layers, by_preset.head_dim) == (384, 2, 16)


def test_model_config_from_gin_clears_earlier_bindings():
    configs.parse([], ["ModelConfig.num_layers = 99"])
    assert configs.model_config_from_gin("tiny").num_layers == 2


def test_include_resolves_from_the_config_dir(tmp_path):
    run = tmp_path / "run.gin"
    run.write_text("include 'models/llama3.2-1b.gin'\nModelConfig.num_layers = 2\n")
    cfg = configs.model_config_from_gin(str(run))
    assert (cfg.num_layers, cfg.hidden_size, cfg.rope_type) == (2, 2048, "llama3")


def test_unknown_parameter_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'models/tiny.gin'\nModelConfig.not_a_field = 1\n")
    with pytest.raises(ValueError, match="not_a_field") as err:
        configs.parse([str(bad)])
    assert "bad.gin" in str(err.value)


def test_unknown_configurable_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("NotAConfigurable.x = 1\n")
    with pytest.raises(ValueError, match="NotAConfigurable"):
        configs.parse([str(bad)])


def test_broken_include_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'models/does-not-exist.gin'\n")
    with pytest.raises(OSError, match="does-not-exist.gin"):
        configs.parse([str(bad)])


def test_unknown_binding_on_the_command_line_is_an_error():
    with pytest.raises(ValueError, match="not_a_field"):
        configs.parse([configs.config_path("models/tiny.gin")], ["ModelConfig.not_a_field = 1"])


def test_config_path_lists_what_exists_when_the_name_is_missing():
    with pytest.raises(FileNotFoundError, match="models/nope.gin") as err:
        configs.config_path("models/nope.gin")
    assert "models/tiny.gin" in str(err.value)
    with pytest.raises(FileNotFoundError):
        configs.model_config_from_gin("nope")
