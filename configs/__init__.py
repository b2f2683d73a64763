"""Packaged gin files: model presets (models/*.gin) and sharding layouts (sharding/*.gin).

`parse` is the one entry point that reads gin: it registers the model's configurables and
puts this folder on gin's search path, so `include 'models/llama3.2-1b.gin'` resolves from
any working directory. Unknown bindings are errors, never skipped. Training's configurables
(TrainConfig, SFTConfig, ...) register when align's modules are imported, which the code
that parses a train file does first (cli/train.py): this package imports nothing of align.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import gin

if TYPE_CHECKING:
    from tandem.model.config import ModelConfig

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def gin_files() -> list[str]:
    """Every *.gin below CONFIG_DIR, as absolute paths, sorted."""
    out = []
    for root, _, names in os.walk(CONFIG_DIR):
        out.extend(os.path.join(root, n) for n in names if n.endswith(".gin"))
    return sorted(out)


def config_path(name: str) -> str:
    """'models/tiny.gin' -> the packaged file's absolute path."""
    path = os.path.join(CONFIG_DIR, name)
    if not os.path.isfile(path):
        available = [os.path.relpath(p, CONFIG_DIR) for p in gin_files()]
        raise FileNotFoundError(f"no packaged gin file {name!r}; available: {available}")
    return path


@functools.cache
def _register() -> None:
    """Imports the modules that declare the model's configurables and adds CONFIG_DIR to
    gin's search path, once per process (gin keeps the search path in a list that never
    dedups)."""
    import tandem.model  # noqa: F401  (registers ModelConfig)
    import tandem.model.sharding  # noqa: F401  (registers logical_rules, make_mesh)

    gin.add_config_file_search_path(CONFIG_DIR)


def parse(files: Sequence[str], bindings: Sequence[str] = ()) -> None:
    """Parses gin files then bindings on top of the current config; fails on unknown names."""
    _register()
    # gin logs an ERROR for every search-path entry an include is not found under before
    # the one it is found under; a real miss still raises, naming the file.
    root = logging.getLogger()
    root.addFilter(_quiet_include_probes)
    try:
        gin.parse_config_files_and_bindings(list(files), list(bindings), skip_unknown=False)
    finally:
        root.removeFilter(_quiet_include_probes)


def _quiet_include_probes(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Path not found:")


def _resolve(file_or_name: str) -> str:
    """A path on disk, a packaged name ('models/tiny.gin') or a preset ('tiny')."""
    if os.path.isfile(file_or_name):
        return file_or_name
    if not file_or_name.endswith(".gin"):
        return config_path(f"models/{file_or_name}.gin")
    return config_path(file_or_name)


def model_config_from_gin(file_or_name: str, bindings: Sequence[str] = ()) -> ModelConfig:
    """A fresh ModelConfig from one gin file (and bindings on top); clears any gin config
    parsed before."""
    from tandem.model.config import ModelConfig

    path = _resolve(file_or_name)
    gin.clear_config()
    parse([path], bindings)
    return ModelConfig()
