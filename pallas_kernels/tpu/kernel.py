"""Ragged paged attention as a Mosaic TPU kernel (same contract as ../reference.py).

Layout. The wrapper pads T to a multiple of the q block and regroups q from [T, N, H] to
[K, T*G, H]: row t*G + g of kv head k is q head k*G + g of token t, so one kv head's G q
heads are stacked as MXU rows and share every K/V fetch. The output comes back the same way.

Grid (K, T / bq), both axes independent ("parallel"). Step (k, b) owns the rows of tokens
[b*bq, (b+1)*bq) for kv head k and
  1. finds the sequences whose q rows overlap the block (a scalar walk over cu_q_lens);
  2. per sequence, walks the kv blocks that its rows can see: from the window start of the
     first row (0 without a window) to the position of the last row. Each kv block is
     `num_pages_per_block` pages; page j of a block is two DMAs (K slot 2k, V slot 2k+1 of
     axis 2) from HBM into VMEM, double-buffered: block i+1 is in flight while block i is
     computed. Pages past the sequence's last page are not fetched;
  3. online softmax in f32 (running max m, sum l, accumulator acc carried by the loop);
  4. writes the rows that belong to the sequence; rows of no sequence (padding) stay 0.

Masking uses `where`, never an additive bias, and V rows past kv_len are zeroed, so stale or
uninitialised VMEM (the interpreter fills it with NaN) and NaN in padding q rows cannot leak
into other rows.

Interpret mode. Only ref indexing with integers and `pl.ds` is used (no ref reshape or
bitcast), so `interpret=True` runs the whole kernel, DMAs and semaphores included, in the
TPU interpreter on CPU (`pltpu.InterpretParams`).

Limits. Not yet compiled on TPU hardware: the per-head DMA slices the second-minor axis of
an HBM page (`.at[page, :, 2k, :]`); if Mosaic rejects that, fetch whole [L, 2K, H] pages
and split K/V with strided VMEM loads, as RPA v2 does. The first kv block of each
sequence is not prefetched during the previous sequence, so decode batches wait on one
DMA round trip per sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tandem.pallas_kernels.reference import DEFAULT_MASK_VALUE
from tandem.pallas_kernels.tpu.tuning import block_sizes


def _start_all(copies):
    for copy in copies:
        copy.start()


def _wait_all(copies):
    for copy in copies:
        copy.wait()


def _kernel(
    # Scalar prefetch (SMEM).
    kv_lens_ref,  # i32[S]
    page_indices_ref,  # i32[S, pages_per_seq]
    cu_q_lens_ref,  # i32[S + 1]
    num_seqs_ref,  # i32[1]
    # Inputs.
    q_ref,  # [R, H], R = bq * G rows of kv head k
    kv_hbm_ref,  # [P, L, 2K, H] in HBM
    # Output.
    o_ref,  # [R, H]
    # Scratch.
    k_bufs,  # [2, bkv, H] VMEM
    v_bufs,  # [2, bkv, H] VMEM
    sems,  # DMA[2], one per buffer slot
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    group: int,
    num_pages_per_block: int,
):
    kv_head, q_block = pl.program_id(0), pl.program_id(1)
    num_rows, head_dim = q_ref.shape
    _, block_kv, _ = k_bufs.shape
    page_size = kv_hbm_ref.shape[1]
    pages_per_seq = page_indices_ref.shape[1]
    num_seqs = num_seqs_ref[0]
    block_q = num_rows // group
    block_start = q_block * block_q
    block_end = block_start + block_q

    o_ref[...] = jnp.zeros_like(o_ref)
    q = q_ref[...]  # [R, H]
    # Token of each row; [R, 1] broadcasts against [R, bkv].
    row_token = block_start + lax.broadcasted_iota(jnp.int32, (num_rows, 1), 0) // group

    # Skip the sequences that end before this block. Reading cu_q_lens[num_seqs] is in
    # bounds (S + 1 entries) and both operands of `&` are evaluated, so it must be.
    seq = lax.while_loop(
        lambda s: (s < num_seqs) & (cu_q_lens_ref[s + 1] <= block_start), lambda s: s + 1, 0
    )

    def attend_sequence(seq):
        q_start, q_end = cu_q_lens_ref[seq], cu_q_lens_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        # Token t of this sequence sits at position t + pos_offset.
        pos_offset = kv_len - (q_end - q_start) - q_start
        first_pos = jnp.maximum(q_start, block_start) + pos_offset
        last_pos = jnp.minimum(q_end, block_end) - 1 + pos_offset
        kv_lo = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
        kv_hi = jnp.minimum(last_pos + 1, kv_len)  # exclusive
        first_block = kv_lo // block_kv
        end_block = (kv_hi + block_kv - 1) // block_kv
        num_pages = jnp.minimum((kv_len + page_size - 1) // page_size, pages_per_seq)
        q_pos = row_token + pos_offset  # [R, 1]
        in_seq = (row_token >= q_start) & (row_token < q_end)  # [R, 1]

        def page_copies(kv_block, slot):
            """(is_fetched, (K copy, V copy)) for each page of a kv block."""
            copies = []
            for j in range(num_pages_per_block):
                page = kv_block * num_pages_per_block + j
                page_id = page_indices_ref[seq, jnp.minimum(page, pages_per_seq - 1)]
                dst = pl.ds(j * page_size, page_size)
                k_copy = pltpu.make_async_copy(
                    kv_hbm_ref.at[page_id, :, 2 * kv_head, :],
                    k_bufs.at[slot, dst, :],
                    sems.at[slot],
                )
                v_copy = pltpu.make_async_copy(
                    kv_hbm_ref.at[page_id, :, 2 * kv_head + 1, :],
                    v_bufs.at[slot, dst, :],
                    sems.at[slot],
                )
                copies.append((page < num_pages, (k_copy, v_copy)))
            return copies

        def start_fetch(kv_block, slot):
            for is_fetched, copies in page_copies(kv_block, slot):
                pl.when(is_fetched)(functools.partial(_start_all, copies))

        def wait_fetch(kv_block, slot):
            for is_fetched, copies in page_copies(kv_block, slot):
                pl.when(is_fetched)(functools.partial(_wait_all, copies))

        @pl.when(first_block < end_block)
        def _():
            start_fetch(first_block, 0)

        def attend_block(kv_block, carry):
            m, l, acc = carry  # [R, 1], [R, 1], [R, H], all f32
            slot = lax.rem(kv_block - first_block, 2)

            @pl.when(kv_block + 1 < end_block)
            def _():
                start_fetch(kv_block + 1, 1 - slot)

            wait_fetch(kv_block, slot)
            k = k_bufs[slot].astype(q.dtype)  # [bkv, H]
            v = v_bufs[slot]  # [bkv, H]
            key_pos = kv_block * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
            # Rows past kv_len hold stale or uninitialised data: p is 0 there, but 0 * NaN is not.
            v_valid = kv_block * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)
            v = jnp.where(v_valid < kv_len, v, jnp.zeros_like(v))

            # [R, H] x [bkv, H] -> [R, bkv]
            logits = lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
            logits = logits * sm_scale
            if soft_cap is not None:
                logits = soft_cap * jnp.tanh(logits / soft_cap)
            mask = in_seq & (key_pos <= q_pos) & (key_pos < kv_len)
            if sliding_window is not None:
                mask &= key_pos > q_pos - sliding_window
            logits = jnp.where(mask, logits, DEFAULT_MASK_VALUE)

            m_next = jnp.maximum(m, logits.max(axis=1, keepdims=True))
            alpha = jnp.exp(m - m_next)
            p = jnp.exp(logits - m_next)  # [R, bkv]
            l_next = alpha * l + p.sum(axis=1, keepdims=True)
            # [R, bkv] x [bkv, H] -> [R, H]
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return m_next, l_next, alpha * acc + pv

        init = (
            jnp.full((num_rows, 1), -jnp.inf, jnp.float32),
            jnp.zeros((num_rows, 1), jnp.float32),
            jnp.zeros((num_rows, head_dim), jnp.float32),
        )
        _, l, acc = lax.fori_loop(first_block, end_block, attend_block, init)
        out = acc / jnp.where(l == 0.0, 1.0, l)
        o_ref[...] = jnp.where(in_seq, out.astype(o_ref.dtype), o_ref[...])

    def step(seq):
        pl.when(cu_q_lens_ref[seq + 1] > cu_q_lens_ref[seq])(lambda: attend_sequence(seq))
        return seq + 1

    lax.while_loop(lambda s: (s < num_seqs) & (cu_q_lens_ref[s] < block_end), step, seq)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "num_queries_per_block",
        "num_pages_per_block",
        "vmem_limit_bytes",
        "interpret",
    ),
)
def ragged_paged_attention_tpu(
    q: jax.Array,  # [T, N, H]
    kv_cache: jax.Array,  # [P, L, 2K, H], K at even and V at odd slots of axis 2
    kv_lens: jax.Array,  # i32[S]
    page_indices: jax.Array,  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[S + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    num_queries_per_block: int | None = None,
    num_pages_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [T, N, H]
    """The Mosaic TPU kernel; arguments as in reference.py, validated by the public wrapper.

    Block sizes default to tuning.py; `interpret=True` runs the TPU interpreter (CPU tests).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_cache.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    pages_per_seq = page_indices.shape[1]
    tuned = block_sizes(
        head_dim=head_dim,
        page_size=page_size,
        group=group,
        num_tokens=num_tokens,
        pages_per_seq=pages_per_seq,
    )
    block_q = num_queries_per_block
    if block_q is None:
        block_q = tuned.num_queries_per_block
    num_pages = num_pages_per_block
    if num_pages is None:
        num_pages = tuned.num_pages_per_block
    if block_q <= 0 or (block_q * group) % 8:
        raise ValueError(
            f"num_queries_per_block * G must be a multiple of 8 rows, got {block_q} * {group}"
        )
    if not 0 < num_pages <= pages_per_seq:
        raise ValueError(f"num_pages_per_block must be in [1, {pages_per_seq}], got {num_pages}")
    block_kv = num_pages * page_size
    num_q_blocks = -(-num_tokens // block_q)
    padded_tokens = num_q_blocks * block_q

    # [T, N, H] -> [T', K, G, H] -> [K, T' * G, H]
    q = jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    q = q.reshape(padded_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    q = q.reshape(num_kv_heads, padded_tokens * group, head_dim)

    q_spec = pl.BlockSpec((None, block_q * group, head_dim), lambda h, b, *_: (h, b, 0))
    kernel = pl.pallas_call(
        functools.partial(
            _kernel,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
            group=group,
            num_pages_per_block=num_pages,
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(num_kv_heads, num_q_blocks),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((2, block_kv, head_dim), kv_cache.dtype),  # K, double-buffered
                pltpu.VMEM((2, block_kv, head_dim), kv_cache.dtype),  # V, double-buffered
                pltpu.SemaphoreType.DMA((2,)),
            ],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=vmem_limit_bytes
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="tandem_ragged_paged_attention",
    )
    out = kernel(
        kv_lens.astype(jnp.int32),
        page_indices.astype(jnp.int32),
        cu_q_lens.astype(jnp.int32),
        num_seqs.astype(jnp.int32),
        q,
        kv_cache,
    )
    # [K, T' * G, H] -> [K, T', G, H] -> [T', N, H] -> [T, N, H]
    out = out.reshape(num_kv_heads, padded_tokens, group, head_dim).transpose(1, 0, 2, 3)
    return out.reshape(padded_tokens, num_q_heads, head_dim)[:num_tokens]
