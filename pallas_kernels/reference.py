"""Ragged paged attention in pure JAX: the oracle for every kernel test and the CPU path.

One call serves decode tokens, prefill chunks and mixed batches. The new tokens of the
sequences are packed along T; sequence s owns q rows cu_q_lens[s]:cu_q_lens[s+1] and its
keys are the first kv_lens[s] slots of the pages page_indices[s] (the new tokens' K/V are
already written there). A query at position p attends to keys at positions <= p (and
> p - sliding_window when a window is set). Softmax is computed in f32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# The two ways to compute it. Per sequence (a loop): each sequence's keys are gathered once,
# but every step of the loop runs all T queries, so the work grows with S x T x keys (a
# decode step of 128 sequences does 128 times the attention it needs). Per token: each
# token gathers its own sequence's keys, the work it needs, but holds T x keys x 2K x H
# floats at once. Per token is taken while that gather stays under this many bytes.
BY_TOKEN_BYTES = 128 * 2**20


# Jitted: one computation whoever calls it (an eager caller would dispatch the gathers op by
# op; on the CPU that also met the TPU kernel's interpret-mode callbacks and hung).
@functools.partial(
    jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "by_token_bytes")
)
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
    by_token_bytes: int = BY_TOKEN_BYTES,
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

    def attend(qg, k, v, q_pos, kv_len, eq):  # eq: "" per sequence, "t" per token
        logits = jnp.einsum(f"tkgh,{eq}skh->tkgs", qg, k) * sm_scale
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        mask = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] < kv_len)  # [T, S_kv]
        if sliding_window is not None:
            mask &= key_pos[None, :] > q_pos[:, None] - sliding_window
        logits = jnp.where(mask[:, None, None, :], logits, DEFAULT_MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum(f"tkgs,{eq}skh->tkgh", probs, v)  # [T, K, G, H]

    if num_tokens * max_kv * num_combined * head_dim * 4 <= by_token_bytes:
        # Each token's sequence: cu_q_lens[s] <= t < cu_q_lens[s + 1]; entries past
        # num_seqs may be anything, so they are made to sort last.
        bounds = jnp.arange(cu_q_lens.shape[0])
        cu = jnp.where(bounds <= num_seqs[0], cu_q_lens, jnp.iinfo(jnp.int32).max)
        seq = jnp.clip(jnp.searchsorted(cu, token, side="right") - 1, 0, kv_lens.shape[0] - 1)
        # [T, pages_per_seq, L, 2K, H] -> [T, S_kv, 2K, H]
        kv = kv_cache[page_indices[seq]].reshape(num_tokens, max_kv, num_combined, head_dim)
        k = kv[:, :, 0::2].astype(jnp.float32)  # [T, S_kv, K, H]
        v = kv[:, :, 1::2].astype(jnp.float32)
        q_pos = kv_lens[seq] - (cu[seq + 1] - cu[seq]) + (token - cu[seq])  # [T]
        attn = attend(qg, k, v, q_pos, kv_lens[seq][:, None], "t")
        is_real = token < cu_q_lens[num_seqs[0]]
        out = jnp.where(is_real[:, None, None, None], attn, 0.0)
        return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)

    def one_sequence(s, out):
        q_start, q_end = cu_q_lens[s], cu_q_lens[s + 1]
        kv_len = kv_lens[s]
        # [pages_per_seq, L, 2K, H] -> [S_kv, 2K, H]
        kv = kv_cache[page_indices[s]].reshape(max_kv, num_combined, head_dim)
        k = kv[:, 0::2].astype(jnp.float32)  # [S_kv, K, H]
        v = kv[:, 1::2].astype(jnp.float32)  # [S_kv, K, H]
        # Query t of this sequence sits at position kv_len - q_len + (t - q_start).
        in_seq = (token >= q_start) & (token < q_end)  # [T]
        q_pos = kv_len - (q_end - q_start) + (token - q_start)  # [T]
        attn = attend(qg, k, v, q_pos, kv_len, "")
        return jnp.where(in_seq[:, None, None, None], attn, out)

    out = jax.lax.fori_loop(0, num_seqs[0], one_sequence, jnp.zeros_like(qg))
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
