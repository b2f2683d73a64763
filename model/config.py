"""The schema of a decoder-only transformer: one frozen dataclass for every family we serve.

Gin binds it (`ModelConfig.num_layers = 16` in configs/models/*.gin); Hugging Face's
`config.json` maps onto it through `from_hf_config` / `to_hf_config`, so a checkpoint
directory and a gin preset describe the same model in the same terms.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import gin

# model_type -> the family's switches; everything else is read from config.json.
FAMILIES = {
    "llama": dict(qkv_bias=False, qk_norm=False),
    "mistral": dict(qkv_bias=False, qk_norm=False),
    "qwen2": dict(qkv_bias=True, qk_norm=False),
    "qwen3": dict(qkv_bias=False, qk_norm=True),
}

ROPE_TYPES = ("default", "linear", "llama3")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer (Llama, Mistral, Qwen2/2.5, Qwen3)."""

    vocab_size: int = gin.REQUIRED
    """V: rows of the embedding table."""
    hidden_size: int = gin.REQUIRED
    """D: width of the residual stream."""
    intermediate_size: int = gin.REQUIRED
    """F: width of the SwiGLU MLP."""
    num_layers: int = gin.REQUIRED
    """Decoder layers."""
    num_heads: int = gin.REQUIRED
    """N: query heads."""
    num_kv_heads: int = gin.REQUIRED
    """K: key/value heads (grouped-query attention when K < N)."""
    head_dim: int | None = None
    """H: per-head width; hidden_size // num_heads when None."""
    model_type: str = "llama"
    """The Hugging Face family: llama, mistral, qwen2 or qwen3."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside every RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_type: str = "default"
    """default, linear or llama3 (Llama 3.1/3.2 frequency scaling)."""
    rope_factor: float = 1.0
    """Scaling factor for linear and llama3 rope."""
    rope_low_freq_factor: float = 1.0
    """llama3 rope: wavelengths above original_max/low_freq_factor are scaled fully."""
    rope_high_freq_factor: float = 4.0
    """llama3 rope: wavelengths below original_max/high_freq_factor are left alone."""
    rope_original_max_position: int = 8192
    """llama3 rope: the context length the model was pre-trained at."""
    max_position_embeddings: int = 4096
    """The longest context the model supports."""
    tie_word_embeddings: bool = False
    """The LM head reuses the embedding table."""
    qkv_bias: bool | None = None
    """Biases on q/k/v projections (Qwen2); the family's default when None."""
    qk_norm: bool | None = None
    """RMSNorm over each head of q and k before rope (Qwen3); the family's default when None."""
    sliding_window: int | None = None
    """Attend only to the last `sliding_window` positions (Mistral v0.1); None for full."""
    bos_token_id: int | None = None
    """Written back to config.json on save."""
    eos_token_id: int | list[int] | None = None
    """Written back to config.json on save; the engine stops on it."""

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(
                f"ModelConfig.model_type: unknown model_type {self.model_type!r}; "
                f"supported: {sorted(FAMILIES)}"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"ModelConfig.rope_type: unknown rope_type {self.rope_type!r}; "
                f"supported: {list(ROPE_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(
                    f"ModelConfig.{name} must be a positive int, got {getattr(self, name)!r}"
                )
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a positive multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        family = FAMILIES[self.model_type]
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", family["qkv_bias"])
        if self.qk_norm is None:
            object.__setattr__(self, "qk_norm", family["qk_norm"])
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"ModelConfig.head_dim is unset and hidden_size ({self.hidden_size}) is "
                    f"not a multiple of num_heads ({self.num_heads})"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for rope, got {self.head_dim}")

    @property
    def group_size(self) -> int:
        """G = N / K query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_heads, self.num_kv_heads
        attn = d * h * (2 * n + 2 * k) + (h * (n + 2 * k) if self.qkv_bias else 0)
        attn += 2 * h if self.qk_norm else 0
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_layers * layer + self.vocab_size * d + d + head

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _rope_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Reads rope settings from either transformers v5 `rope_parameters` or the v4
    `rope_theta` + `rope_scaling` pair that checkpoints on disk carry."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"{where}: unsupported rope_type {rope_type!r}; supported: {list(ROPE_TYPES)}"
        )
    out = dict(rope_theta=float(theta), rope_type=rope_type)
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        out["rope_original_max_position"] = int(params["original_max_position_embeddings"])
    return out


def from_hf_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Maps a parsed Hugging Face `config.json` onto a ModelConfig; errors name `where`."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{where}: unknown model_type {model_type!r}; supported: {sorted(FAMILIES)}"
        )
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    num_heads = hf["num_attention_heads"]
    sliding_window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        sliding_window = None
    if model_type == "llama":
        sliding_window = None
    attention_bias = hf.get("attention_bias")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        model_type=model_type,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=(
            FAMILIES[model_type]["qkv_bias"]
            if attention_bias is None or model_type == "qwen2"
            else bool(attention_bias)
        ),
        sliding_window=sliding_window,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        **_rope_from_hf(hf, where),
    )


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` that `transformers` loads as the same model."""
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_position,
        )
    architectures = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }
    hf: dict[str, Any] = {
        "architectures": [architectures[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        # v5 reads rope_parameters; v4 reads rope_theta / rope_scaling.
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_type == "default" else rope,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }
    if cfg.model_type == "llama":
        hf["attention_bias"] = cfg.qkv_bias
        hf["mlp_bias"] = False
    elif cfg.qkv_bias != FAMILIES[cfg.model_type]["qkv_bias"]:
        raise ValueError(
            f"model_type {cfg.model_type!r} cannot express qkv_bias={cfg.qkv_bias} in config.json"
        )
    if cfg.qk_norm != FAMILIES[cfg.model_type]["qk_norm"]:
        raise ValueError(
            f"model_type {cfg.model_type!r} cannot express qk_norm={cfg.qk_norm} in config.json"
        )
    if cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    elif cfg.model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = cfg.sliding_window is not None
        hf["sliding_window"] = cfg.sliding_window
        if cfg.sliding_window is not None:
            hf["max_window_layers"] = 0
    elif cfg.sliding_window is not None:
        raise ValueError("model_type 'llama' has no sliding window in config.json")
    return hf


def rope_inv_freq(cfg: ModelConfig) -> list[float]:
    """Rotary inverse frequencies [H/2], with the family's scaling applied (host-side)."""
    h = cfg.head_dim
    inv = [1.0 / (cfg.rope_theta ** (2 * i / h)) for i in range(h // 2)]
    if cfg.rope_type == "linear":
        return [f / cfg.rope_factor for f in inv]
    if cfg.rope_type != "llama3":
        return inv
    low_wavelen = cfg.rope_original_max_position / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_position / cfg.rope_high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / cfg.rope_factor)
        else:
            smooth = (cfg.rope_original_max_position / wavelen - cfg.rope_low_freq_factor) / (
                cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
            )
            out.append((1 - smooth) * f / cfg.rope_factor + smooth * f)
    return out
