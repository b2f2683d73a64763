"""The decoder-only transformer: embed, N decoder layers, final norm, LM head.

`__call__` is the training forward (full, possibly packed sequences, causal mask);
`forward_paged` is the serving forward (ragged new tokens over a paged KV cache).
Both return f32 logits from the same weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tandem.model.attention_metadata import AttentionMetadata
from tandem.model.config import ModelConfig
from tandem.model.layers import DecoderLayer, RMSNorm, param
from tandem.model.sharding import constrain


def causal_mask(
    positions: jax.Array,  # i32[B, T]
    segment_ids: jax.Array | None,  # i32[B, T]; 0 marks padding
    sliding_window: int | None,
) -> jax.Array:  # bool[B, T, T]
    """Key s is visible to query t when it is not later, in the same segment, in the window."""
    t = positions.shape[-1]
    idx = jnp.arange(t)
    mask = jnp.broadcast_to(idx[None, :] <= idx[:, None], (positions.shape[0], t, t))
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    if sliding_window is not None:
        mask &= positions[:, None, :] > positions[:, :, None] - sliding_window
    return mask


def segment_positions(segment_ids: jax.Array) -> jax.Array:  # i32[B, T] -> i32[B, T]
    """Positions that restart at 0 where a new segment begins (packed sequences)."""
    t = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
        axis=-1,
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype, ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), dtype, ("embed", "vocab"))

    def logits(self, x: jax.Array) -> jax.Array:  # [..., D] -> f32[..., V]
        x = self.norm(x)
        if self.lm_head is None:
            out = jnp.einsum(
                "...d,vd->...v", x, self.embed[...], preferred_element_type=jnp.float32
            )
        else:
            out = jnp.einsum(
                "...d,dv->...v", x, self.lm_head[...], preferred_element_type=jnp.float32
            )
        return out

    def __call__(
        self,
        tokens: jax.Array,  # i32[B, T]
        positions: jax.Array | None = None,  # i32[B, T]
        segment_ids: jax.Array | None = None,  # i32[B, T] packed sequences
    ) -> jax.Array:  # f32[B, T, V]
        logits = self.logits(self.features(tokens, positions, segment_ids))
        return constrain(logits, ("act_batch", "act_seq", "act_vocab"))

    def features(
        self,
        tokens: jax.Array,  # i32[B, T]
        positions: jax.Array | None = None,  # i32[B, T]
        segment_ids: jax.Array | None = None,  # i32[B, T]
    ) -> jax.Array:  # [B, T, D] the last layer's output, before the final norm
        """The decoder stack without the head: reward and value heads read these."""
        if positions is None:
            positions = (
                segment_positions(segment_ids)
                if segment_ids is not None
                else jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            )
        mask = causal_mask(positions, segment_ids, self.config.sliding_window)
        x = jnp.take(self.embed[...], tokens, axis=0)  # [B, T, D]
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        for layer in self.layers:
            x = layer(x, positions, mask)
        return x

    def forward_paged(
        self,
        tokens: jax.Array,  # i32[T] the step's new tokens, packed
        kv_caches: list[jax.Array],  # per layer [P, L, 2K, H]
        md: AttentionMetadata,
    ) -> tuple[jax.Array, list[jax.Array]]:  # f32[T, V], updated caches
        x, kv_caches = self.paged_features(tokens, kv_caches, md)
        return self.logits(x), kv_caches

    def paged_features(
        self,
        tokens: jax.Array,  # i32[T]
        kv_caches: list[jax.Array],  # per layer [P, L, 2K, H]
        md: AttentionMetadata,
    ) -> tuple[jax.Array, list[jax.Array]]:  # [T, D] before the final norm, updated caches
        """The serving forward without the head: the engine applies `logits` to the rows
        it samples only (a 2048-token prefill chunk samples one)."""
        x = jnp.take(self.embed[...], tokens, axis=0)  # [T, D]
        new_caches = []
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, kv_cache = layer.paged(x, kv_cache, md)
            new_caches.append(kv_cache)
        return x, new_caches
