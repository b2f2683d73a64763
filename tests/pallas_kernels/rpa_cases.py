"""Inputs for ragged paged attention tests, and a dense NumPy oracle independent of JAX.

A case is a list of (q_len, kv_len) per sequence. Pages are scattered at random over the
cache; slots past each kv_len, unused page-table entries, unused sequence slots and
padding q rows all hold garbage, so a kernel that reads them shows it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

# Filler for cache slots no query may see; finite, because the reference computes p @ v
# over the whole page and 0 * NaN would poison it.
STALE_KV = 1e3
# Page ids for unused page-table entries: out of range, so touching one fails loudly.
BAD_PAGE = 1 << 20


@dataclasses.dataclass(frozen=True)
class Inputs:
    q: jnp.ndarray  # [T, N, H]
    kv_cache: jnp.ndarray  # [P, L, 2K, H]
    kv_lens: jnp.ndarray  # i32[S]
    page_indices: jnp.ndarray  # i32[S, pages_per_seq]
    cu_q_lens: jnp.ndarray  # i32[S + 1]
    num_seqs: jnp.ndarray  # i32[1]

    def args(self):
        return (
            self.q,
            self.kv_cache,
            self.kv_lens,
            self.page_indices,
            self.cu_q_lens,
            self.num_seqs,
        )


def make_inputs(
    seqs: list[tuple[int, int]],
    *,
    page_size: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype=jnp.float32,
    num_tokens: int | None = None,
    max_num_seqs: int | None = None,
    pages_per_seq: int | None = None,
    num_pages: int | None = None,
    padding_value: float = np.nan,
    seed: int = 0,
) -> Inputs:
    """Sizes left as None get a little slack (padding rows, a spare sequence slot, a spare
    page-table column, pages nobody owns); fix them to share one compiled shape."""
    rs = np.random.RandomState(seed)
    assert all(0 < q_len <= kv_len for q_len, kv_len in seqs)
    q_lens = [q_len for q_len, _ in seqs]
    pages_needed = [-(-kv_len // page_size) for _, kv_len in seqs]
    num_tokens = num_tokens or sum(q_lens) + 3
    max_num_seqs = max_num_seqs or len(seqs) + 1
    pages_per_seq = pages_per_seq or max(pages_needed) + 1
    num_pages = num_pages or sum(pages_needed) + 2
    assert num_tokens >= sum(q_lens) and max_num_seqs >= len(seqs)
    assert pages_per_seq >= max(pages_needed) and num_pages >= sum(pages_needed)

    kv = rs.standard_normal((num_pages, page_size, 2 * num_kv_heads, head_dim))
    page_ids = rs.permutation(num_pages)
    page_indices = np.full((max_num_seqs, pages_per_seq), BAD_PAGE, np.int32)
    used = 0
    for s, ((_, kv_len), n) in enumerate(zip(seqs, pages_needed)):
        page_indices[s, :n] = page_ids[used : used + n]
        used += n
        # Slots past kv_len in the last page: stale data from an earlier owner.
        tail = kv_len - (n - 1) * page_size
        kv[page_indices[s, n - 1], tail:] = STALE_KV

    q = rs.standard_normal((num_tokens, num_kv_heads * group, head_dim))
    q[sum(q_lens) :] = padding_value
    cu_q_lens = np.full(max_num_seqs + 1, sum(q_lens), np.int32)
    cu_q_lens[: len(seqs) + 1] = np.concatenate([[0], np.cumsum(q_lens)])
    kv_lens = np.full(max_num_seqs, 7777, np.int32)  # garbage in the spare slots
    kv_lens[: len(seqs)] = [kv_len for _, kv_len in seqs]
    return Inputs(
        q=jnp.asarray(q, dtype),
        kv_cache=jnp.asarray(kv, dtype),
        kv_lens=jnp.asarray(kv_lens),
        page_indices=jnp.asarray(page_indices),
        cu_q_lens=jnp.asarray(cu_q_lens),
        num_seqs=jnp.asarray([len(seqs)], jnp.int32),
    )


def dense_attention(
    inputs: Inputs, *, sm_scale: float, sliding_window=None, soft_cap=None
) -> np.ndarray:  # [T, N, H] float64
    """Loop over sequences, gather each one's pages into a dense K/V, causal mask with the
    sequence's position offset, softmax in float64. Padding rows are 0."""
    q = np.asarray(inputs.q.astype(jnp.float32), np.float64)
    kv = np.asarray(inputs.kv_cache.astype(jnp.float32), np.float64)
    kv_lens = np.asarray(inputs.kv_lens)
    page_indices = np.asarray(inputs.page_indices)
    cu = np.asarray(inputs.cu_q_lens)
    num_kv_heads = kv.shape[2] // 2
    group = q.shape[1] // num_kv_heads
    out = np.zeros_like(q)
    for s in range(int(inputs.num_seqs[0])):
        kv_len = int(kv_lens[s])
        n = -(-kv_len // kv.shape[1])
        pages = kv[page_indices[s, :n]].reshape(-1, 2 * num_kv_heads, kv.shape[3])[:kv_len]
        k = np.repeat(pages[:, 0::2], group, axis=1)  # [S_kv, N, H]
        v = np.repeat(pages[:, 1::2], group, axis=1)  # [S_kv, N, H]
        qs = q[cu[s] : cu[s + 1]]  # [q_len, N, H]
        logits = np.einsum("tnh,snh->nts", qs, k) * sm_scale
        if soft_cap is not None:
            logits = soft_cap * np.tanh(logits / soft_cap)
        q_pos = kv_len - len(qs) + np.arange(len(qs))[:, None]
        key_pos = np.arange(kv_len)[None, :]
        mask = key_pos <= q_pos
        if sliding_window is not None:
            mask &= key_pos > q_pos - sliding_window
        logits = np.where(mask[None], logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[cu[s] : cu[s + 1]] = np.einsum("nts,snh->tnh", probs, v)
    return out
