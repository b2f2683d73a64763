"""Ragged paged attention in pure JAX: the oracle for every kernel test and the CPU path.

One call serves decode tokens, prefill chunks and mixed batches. The new tokens of the
sequences are packed along T; sequence s owns q rows cu_q_lens[s]:cu_q_lens[s+1] and its
keys are the first kv_lens[s] slots of the pages page_indices[s] (the new tokens' K/V are
already written there). A query at position p attends to keys at positions <= p (and
> p - sliding_window when a window is set). Softmax is computed in f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, N, H]
    kv_cache: jax.Array,  # [P, L, 2K, H], K at even and V at odd slots of axis 2
    kv_lens: jax.Array,  # i32[S] keys per sequence, the new tokens included
    page_indices: jax.Array,  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[S + 1]
    num_seqs: jax.Array,  # i32[1] sequences in use; rows past cu_q_lens[num_seqs] are padding
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:  # [T, N, H]
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_cache.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    pages_per_seq = page_indices.shape[1]
    max_kv = pages_per_seq * page_size

    # [T, K, G, H]
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    token = jnp.arange(num_tokens)
    key_pos = jnp.arange(max_kv)

    def one_sequence(s, out):
        q_start, q_end = cu_q_lens[s], cu_q_lens[s + 1]
        kv_len = kv_lens[s]
        # [pages_per_seq, L, 2K, H] -> [S_kv, 2K, H]
        kv = kv_cache[page_indices[s]].reshape(max_kv, num_combined, head_dim)
        k = kv[:, 0::2].astype(jnp.float32)  # [S_kv, K, H]
        v = kv[:, 1::2].astype(jnp.float32)  # [S_kv, K, H]
        logits = jnp.einsum("tkgh,skh->tkgs", qg, k) * sm_scale
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        # Query t of this sequence sits at position kv_len - q_len + (t - q_start).
        in_seq = (token >= q_start) & (token < q_end)  # [T]
        q_pos = kv_len - (q_end - q_start) + (token - q_start)  # [T]
        mask = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] < kv_len)  # [T, S_kv]
        if sliding_window is not None:
            mask &= key_pos[None, :] > q_pos[:, None] - sliding_window
        logits = jnp.where(mask[:, None, None, :], logits, DEFAULT_MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1)
        attn = jnp.einsum("tkgs,skh->tkgh", probs, v)  # [T, K, G, H]
        return jnp.where(in_seq[:, None, None, None], attn, out)

    out = jax.lax.fori_loop(0, num_seqs[0], one_sequence, jnp.zeros_like(qg))
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
