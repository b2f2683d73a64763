"""The pieces of a decoder layer: RMSNorm, rotary embeddings, attention, SwiGLU MLP.

Every weight is an `nnx.Param` with `logical_axes` metadata; model/sharding.py maps those
names onto the mesh. Attention has two paths over the same weights: `__call__` for
training (full sequences, masks) and `paged` for serving (a paged KV cache, metadata).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tandem.model.attention_metadata import AttentionMetadata
from tandem.model.config import ModelConfig, rope_inv_freq
from tandem.model.kv_cache import write_kv
from tandem.model.sharding import constrain
from tandem.pallas_kernels import ragged_paged_attention

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def param(rngs: nnx.Rngs, shape, dtype, axes, init=None) -> nnx.Param:
    init = init or jax.nn.initializers.normal(stddev=0.02)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), dtype, ("norm",), jax.nn.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in f32, cast back, then scale: Hugging Face's order, so bf16 matches too.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * xf.astype(x.dtype)


def apply_rope(
    x: jax.Array,  # [..., T, N, H]
    positions: jax.Array,  # [..., T]
    inv_freq: jax.Array,  # f32[H/2]
) -> jax.Array:
    """Rotates the two halves of each head (the Llama/HF layout, not interleaved pairs)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [..., T, H/2]
    cos = jnp.cos(angles)[..., None, :].astype(x.dtype)  # [..., T, 1, H/2]
    sin = jnp.sin(angles)[..., None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.sm_scale = h**-0.5
        self.sliding_window = cfg.sliding_window
        self.inv_freq = tuple(rope_inv_freq(cfg))
        self.q_proj = param(rngs, (d, n, h), dtype, ("embed", "q_heads", "head_dim"))
        self.k_proj = param(rngs, (d, k, h), dtype, ("embed", "kv_heads", "head_dim"))
        self.v_proj = param(rngs, (d, k, h), dtype, ("embed", "kv_heads", "head_dim"))
        self.o_proj = param(rngs, (n, h, d), dtype, ("q_heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            zeros = jax.nn.initializers.zeros
            self.q_bias = param(rngs, (n, h), dtype, ("q_heads", "head_dim"), zeros)
            self.k_bias = param(rngs, (k, h), dtype, ("kv_heads", "head_dim"), zeros)
            self.v_bias = param(rngs, (k, h), dtype, ("kv_heads", "head_dim"), zeros)
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dtype, rngs)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dtype, rngs)
        else:
            self.q_norm = self.k_norm = None

    def qkv(
        self,
        x: jax.Array,  # [..., T, D]
        positions: jax.Array,  # [..., T]
    ) -> tuple[jax.Array, jax.Array, jax.Array]:  # [..., T, N|K, H]
        q = jnp.einsum("...td,dnh->...tnh", x, self.q_proj[...])
        k = jnp.einsum("...td,dkh->...tkh", x, self.k_proj[...])
        v = jnp.einsum("...td,dkh->...tkh", x, self.v_proj[...])
        if self.q_bias is not None:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # i32[B, T]
        mask: jax.Array,  # bool[B, T, S] (S == T: full sequences)
    ) -> jax.Array:  # [B, T, D]
        b, t, _ = x.shape
        q, k, v = self.qkv(x, positions)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", "head_dim"))
        # [B, T, N, H] -> [B, T, K, G, H]
        q = q.reshape(b, t, self.num_kv_heads, -1, self.head_dim)
        logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
        logits = jnp.where(mask[:, None, None], logits * self.sm_scale, MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, self.num_heads, -1)
        return jnp.einsum("btnh,nhd->btd", out, self.o_proj[...])

    def paged(
        self,
        x: jax.Array,  # [T, D]
        kv_cache: jax.Array,  # [P, L, 2K, H]
        md: AttentionMetadata,
    ) -> tuple[jax.Array, jax.Array]:  # [T, D], the updated cache
        q, k, v = self.qkv(x, md.positions)
        kv_cache = write_kv(kv_cache, k, v, md.slot_mapping)
        out = ragged_paged_attention(
            q,
            kv_cache,
            md.kv_lens,
            md.page_indices,
            md.cu_q_lens,
            md.num_seqs,
            sm_scale=self.sm_scale,
            sliding_window=self.sliding_window,
        )  # [T, N, H]
        return jnp.einsum("tnh,nhd->td", out, self.o_proj[...]), kv_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = param(rngs, (d, f), dtype, ("embed", "mlp"))
        self.up_proj = param(rngs, (d, f), dtype, ("embed", "mlp"))
        self.down_proj = param(rngs, (f, d), dtype, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
        gate = jnp.einsum("...d,df->...f", x, self.gate_proj[...])
        up = jnp.einsum("...d,df->...f", x, self.up_proj[...])
        hidden = constrain(jax.nn.silu(gate) * up, (None,) * (x.ndim - 1) + ("act_mlp",))
        return jnp.einsum("...f,fd->...d", hidden, self.down_proj[...])


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        self.attn = Attention(cfg, dtype, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, positions, mask):  # [B, T, D] -> [B, T, D]
        x = x + self.attn(self.input_norm(x), positions, mask)
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        return x + self.mlp(self.post_attn_norm(x))

    def paged(self, x, kv_cache, md):  # [T, D] -> [T, D]
        attn, kv_cache = self.attn.paged(self.input_norm(x), kv_cache, md)
        x = x + attn
        return x + self.mlp(self.post_attn_norm(x)), kv_cache
