"""Work description for the Mosaic GPU kernel: q tiles, their key ranges, split merging.

The kernel's grid is static, (K, num_slots, num_splits), but how many q tiles a batch has
depends on cu_q_lens. Each of the S + 1 "owners" (the S sequence slots, then the padding
rows after the last live sequence) gets a run of consecutive slots,

    first_slot(s) = s + floor(start_s / tq),

which is increasing in s and leaves owner s with 1 + floor(end_s/tq) - floor(start_s/tq)
>= ceil((end_s - start_s) / tq) slots: enough for its tiles, and the runs fit in
S + 1 + floor(T / tq) slots. A slot's owner is the last s with first_slot(s) <= slot (a
binary search over s, ceil(log2(S + 1)) dependent loads of cu_q_lens, done by every CTA
itself: no XLA pass before the kernel). Tile j of owner s covers tokens
[start_s + j*tq, min(start_s + (j+1)*tq, end_s)); slots past an owner's tiles are idle.

A tile is described by:

    seq     row of page_indices / kv_lens (clamped to S - 1 for the padding owner)
    t0      first token of the tile
    num     tokens of the tile (0: idle slot)
    pos0    position of the tile's first token in its sequence: kv_len - q_len + (t0 - start)
    kv_lo   first key any row may see: max(0, pos0 - window + 1), or 0
    kv_hi   one past the last key any row may see: pos0 + num (0 for padding tiles, whose
            rows have no keys and come out 0, as from the reference)

Token i of the tile attends to keys k with k <= pos0 + i (and k > pos0 + i - window).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from tandem.pallas_kernels.gpu.tuning import num_slots


class Tile(NamedTuple):  # a pytree, so tile_metadata can vmap find_tile
    seq: jax.Array
    t0: jax.Array
    num: jax.Array
    pos0: jax.Array
    kv_lo: jax.Array
    kv_hi: jax.Array


def find_tile(
    slot,  # i32 scalar
    cu_q_lens_at: Callable,  # i -> cu_q_lens[i], i in [0, S]
    kv_lens_at: Callable,  # i -> kv_lens[i], i in [0, S)
    num_live,  # i32 scalar: num_seqs[0]
    *,
    max_num_seqs: int,
    num_tokens: int,
    tokens_per_tile: int,
    sliding_window: int | None,
    guess: bool = True,
) -> Tile:
    """The tile of one slot, from scalars only: runs inside the kernel on loads from GMEM
    and, vectorised with vmap, on arrays (tile_metadata). cu_q_lens[0] must be 0.

    Each load from GMEM costs a round trip that nothing else hides at the start of a CTA,
    so the owner is first guessed as if the batch were all decodes (one token per
    sequence: first_slot(s) = s + floor(s / tq)) and checked with loads that do not
    depend on each other (num_seqs, cu_q_lens at the guess and the next, the guess's
    kv_len); only a wrong guess pays for the binary search (`guess=False` always
    searches)."""
    tq = tokens_per_tile
    last = max_num_seqs

    def start(s):  # first token of owner s (T for owners past the padding)
        first = jnp.clip(cu_q_lens_at(jnp.minimum(s, last)), 0, num_tokens)
        return jnp.where(s <= num_live, first, num_tokens)

    def first_slot(s, start_s):
        return s + lax.div(start_s, jnp.int32(tq))

    def described(owner, first, next_start, kv_len) -> Tile:
        # next_start = start(owner + 1): the live owner's end, T for the padding owner.
        end = jnp.clip(next_start, first, num_tokens)
        t0 = first + (slot - first_slot(owner, first)) * tq
        num = jnp.where(first_slot(owner, first) <= slot, jnp.clip(end - t0, 0, tq), 0)
        seq = jnp.minimum(owner, max_num_seqs - 1)
        is_seq = (owner < num_live) & (num > 0)
        pos0 = jnp.where(is_seq, kv_len - (end - first) + (t0 - first), 0)
        kv_hi = jnp.where(is_seq, pos0 + num, 0)
        kv_lo = jnp.zeros_like(kv_hi)
        if sliding_window is not None:
            kv_lo = jnp.where(is_seq, jnp.maximum(pos0 - sliding_window + 1, 0), 0)
        return Tile(seq=seq, t0=t0, num=num, pos0=pos0, kv_lo=kv_lo, kv_hi=kv_hi)

    def of_owner(owner) -> Tile:
        return described(
            owner, start(owner), start(owner + 1), kv_lens_at(jnp.minimum(owner, last - 1))
        )

    def search() -> Tile:
        lo, hi = jnp.int32(0), jnp.int32(max_num_seqs + 1)  # owner in [lo, hi)
        for _ in range(math.ceil(math.log2(max_num_seqs + 1))):
            mid = lax.div(lo + hi, jnp.int32(2))
            right = first_slot(mid, start(mid)) <= slot
            lo, hi = jnp.where(right, mid, lo), jnp.where(right, hi, mid)
        return of_owner(lo)

    if not guess:
        return search()
    # first_slot is strictly increasing, so owner = g iff first_slot(g) <= slot <
    # first_slot(g + 1) (g = S, the padding owner, has no upper neighbour to check: its
    # run ends at the last slot).
    g = jnp.clip(slot - lax.div(slot + 1, jnp.int32(tq + 1)), 0, max_num_seqs)
    start_g, start_next = start(g), start(g + 1)
    hit = (first_slot(g, start_g) <= slot) & (
        (g == max_num_seqs) | (slot < first_slot(g + 1, start_next))
    )
    guessed = described(g, start_g, start_next, kv_lens_at(jnp.minimum(g, last - 1)))
    return lax.cond(hit, lambda: guessed, search)


def tile_metadata(
    kv_lens: jax.Array,  # i32[S]
    cu_q_lens: jax.Array,  # i32[S + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    num_tokens: int,
    tokens_per_tile: int,
    sliding_window: int | None,
    guess: bool = True,
) -> Tile:  # each field i32[num_slots]
    """find_tile for every slot at once (what the kernel's CTAs compute, for tests)."""
    max_num_seqs = kv_lens.shape[0]
    kv_lens, cu_q_lens = kv_lens.astype(jnp.int32), cu_q_lens.astype(jnp.int32)

    def one(slot):
        return find_tile(
            slot,
            lambda i: cu_q_lens[i],
            lambda i: kv_lens[i],
            num_seqs[0].astype(jnp.int32),
            max_num_seqs=max_num_seqs,
            num_tokens=num_tokens,
            tokens_per_tile=tokens_per_tile,
            sliding_window=sliding_window,
            guess=guess,
        )

    slots = jnp.arange(num_slots(max_num_seqs, num_tokens, tokens_per_tile), dtype=jnp.int32)
    return jax.vmap(one)(slots)


def split_blocks(kv_lo, kv_hi, split, num_splits: int, block_kv: int):
    """(first block, number of blocks) of one split of the keys [kv_lo, kv_hi).

    Blocks are block_kv keys aligned to multiples of block_kv (whole pages); the tile's
    blocks floor(kv_lo / bkv) .. ceil(kv_hi / bkv) are cut into num_splits runs of equal
    length, so ragged sequences split evenly. Works on traced int32 scalars (inside the
    kernel) and on Python ints alike."""
    lo = lax.div(kv_lo, block_kv)
    hi = lax.div(kv_hi + block_kv - 1, block_kv)
    if num_splits == 1:
        return lo, jnp.maximum(hi - lo, 0)
    per_split = lax.div(hi - lo + num_splits - 1, num_splits)
    first = lo + split * per_split
    return first, jnp.clip(hi - first, 0, per_split)


def merge_splits(
    out_parts: jax.Array,  # [num_splits, T, N, H], each normalised by its own sum
    lse_parts: jax.Array,  # f32[num_splits, T, N], log2(sum exp) of the scaled logits
    dtype,
) -> jax.Array:  # [T, N, H]
    """out = sum_p 2^(lse_p - m) * out_p / sum_p 2^(lse_p - m), m = max_p lse_p, in f32.

    Empty splits carry lse = -inf and weigh 0; rows no split saw (padding) come out 0.
    Written as one elementwise expression over [T, N, H] with the (few) splits unrolled,
    so that XLA emits a single loop fusion: at small batches the merge costs about one
    kernel launch, and a second fusion (weights first, then the weighted sum) measured
    as much again."""
    lse = [lse_parts[p][..., None] for p in range(lse_parts.shape[0])]  # [T, N, 1] each
    top = functools.reduce(jnp.maximum, lse)
    top = jnp.where(top == -jnp.inf, 0.0, top)
    weights = [jnp.exp2(x - top) for x in lse]
    total = functools.reduce(jnp.add, weights)
    out = functools.reduce(
        jnp.add, [w * out_parts[p].astype(jnp.float32) for p, w in enumerate(weights)]
    )  # [T, N, H]
    return (out / jnp.where(total > 0, total, 1.0)).astype(dtype)
