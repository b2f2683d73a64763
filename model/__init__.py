"""Flax NNX decoder-only transformers and their Hugging Face checkpoint I/O."""

from tandem.model.attention_metadata import AttentionMetadata
from tandem.model.config import ModelConfig, from_hf_config, to_hf_config
from tandem.model.transformer import Transformer

__all__ = ["AttentionMetadata", "ModelConfig", "Transformer", "from_hf_config", "to_hf_config"]
