"""Ragged paged attention as a Mosaic GPU kernel for Hopper (same contract as ../reference.py).

One kernel launch for decode, prefill chunks and mixed batches (plus the split merge when
split-K is on). A q tile is ROWS = 64 wgmma rows: tq = 64 // G
consecutive tokens of one sequence times the G q heads of one kv head, row i*G + g being
head g of token t0 + i (decode: 1 token, G useful rows; wgmma needs M = 64 and the spare
rows cost nothing while the kernel is bound by reading K/V).

Grid (num_slots, K, num_splits), split fastest, then kv head, then slot: CTAs running
together read neighbouring rows of the same pages, and the idle slots at the end of the
slot range (see tiles.py) launch last instead of taking SMs from real tiles. 232
registers per thread (the consumer's) allow one CTA per SM. Each CTA finds its tile from
cu_q_lens by itself (tiles.find_tile: a binary search over the sequences) and its run of
kv blocks (tiles.split_blocks). Then:
  * warpgroup 1 (producer) reads the block table and issues one TMA per page for K
    (kv slot 2k) and one for V (slot 2k+1) into a `num_stages`-deep ring of SMEM buffers,
    waiting on "free" barriers before reusing a buffer. Pages past the tile's last key
    are redirected to its last page: real cache data, masked out, never an unowned page;
  * warpgroup 0 (consumer) loads the tile's q rows (one [G, H] TMA per token, straight from
    q[T, N, H]), computes S = Q K^T with wgmma, masks keys past each row's position (and
    outside the sliding window), scales (and soft-caps) the logits, runs the online
    softmax in the exp2 domain, and accumulates O += P V with wgmma;
  * the consumer stages O (and its log2-sum-exp) in SMEM and writes each token's G rows
    with one predicated TMA store straight into out[T, N, H], so rows of other sequences
    that share the 64-row tile are never written.
With split-K each split writes its normalised partial (q dtype) and log2-sum-exp, and
tiles.merge_splits combines them in two small XLA fusions. (A merge inside the kernel, the
splits of a tile as one CTA cluster reading each other's SMEM, measured no faster at 2
splits and slower at 4 and 8: clusters of one-CTA-per-SM blocks schedule poorly.)

Masking uses -inf with guards (a row with no visible key in a split keeps m = -inf and
l = 0, contributes weight 0 and writes lse = -inf), so NaN in padding q rows stays in those
rows, which are never stored. Padding rows after the last sequence get tiles without keys
and come out 0.

Limits (unsupported_reason): q and cache both bf16 or f16; head_dim 64 or 128; page size a
multiple of 8 in [8, 128]; G <= 64; split-K only when G % 4 == 0; compute capability 9.x.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from tandem.pallas_kernels.gpu import tiles, tuning

ROWS = tuning.ROWS
LOG2E = math.log2(math.e)
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernel body is specialised on."""

    num_tokens: int
    num_kv_heads: int
    group: int
    head_dim: int
    page_size: int
    dtype: jnp.dtype
    tokens_per_tile: int
    block_kv: int
    num_stages: int
    num_splits: int
    sm_scale: float
    sliding_window: int | None
    soft_cap: float | None

    @property
    def pages_per_block(self) -> int:
        return self.block_kv // self.page_size


def unsupported_reason(q: jax.Array, kv_cache: jax.Array) -> str | None:
    """Why the kernel cannot take these inputs (the dispatcher then runs the reference);
    None when it can. Shapes and dtypes only, so it runs at trace time."""
    _, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_cache.shape
    group = num_q_heads // (num_combined // 2)
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES or q.dtype != kv_cache.dtype:
        return f"q {q.dtype} / kv_cache {kv_cache.dtype}: the kernel takes bf16 or f16 for both"
    if head_dim not in tuning.SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} not in {tuning.SUPPORTED_HEAD_DIMS}"
    if page_size % 8 or not tuning.MIN_PAGE_SIZE <= page_size <= tuning.MAX_PAGE_SIZE:
        return f"page size {page_size} is not a multiple of 8 in [8, 128]"
    if group > ROWS:
        return f"{group} q heads per kv head do not fit the {ROWS} rows of a tile"
    return None


def ragged_paged_attention_gpu(
    q: jax.Array,  # [T, N, H]
    kv_cache: jax.Array,  # [P, L, 2K, H]
    kv_lens: jax.Array,  # i32[S]
    page_indices: jax.Array,  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[S + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    num_splits: int | None = None,
    block_kv: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:  # [T, N, H]
    """The Mosaic GPU kernel; block sizes and splits default to tuning.py's choice."""
    if reason := unsupported_reason(q, kv_cache):
        raise ValueError(reason)
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_combined, _ = kv_cache.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    max_num_seqs, pages_per_seq = page_indices.shape
    block = tuning.block_config(head_dim, page_size)
    block_kv = block_kv or block.block_kv
    num_stages = num_stages or block.num_stages
    if block_kv % page_size or block_kv % 64 or block_kv > 256:
        raise ValueError(
            f"block_kv {block_kv} must be 64..256, a multiple of 64 and of {page_size}"
        )
    if num_stages < 2:
        raise ValueError(f"num_stages must be >= 2, got {num_stages}")
    if num_splits is None:
        max_blocks = -(-pages_per_seq * page_size // block_kv)
        num_splits = tuning.num_splits(
            num_kv_heads=num_kv_heads,
            max_num_seqs=max_num_seqs,
            num_tokens=num_tokens,
            group=group,
            max_kv_blocks=max_blocks,
        )
    if num_splits < 1 or (num_splits > 1 and group % tuning.SPLIT_GROUP_ALIGN):
        raise ValueError(
            f"num_splits {num_splits}: must be >= 1, and 1 unless G ({group}) is a multiple "
            f"of {tuning.SPLIT_GROUP_ALIGN}"
        )
    smem = tuning.smem_bytes(
        head_dim,
        tuning.BlockConfig(block_kv, num_stages),
        itemsize=q.dtype.itemsize,
        split=num_splits > 1,
    )
    if smem > tuning.SMEM_LIMIT:
        raise ValueError(f"block_kv {block_kv} x {num_stages} stages needs {smem} B of SMEM")
    static = _Static(
        num_tokens=num_tokens,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        page_size=page_size,
        dtype=jnp.dtype(q.dtype),
        tokens_per_tile=tuning.tokens_per_tile(group),
        block_kv=block_kv,
        num_stages=num_stages,
        num_splits=num_splits,
        sm_scale=float(sm_scale),
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    call = _build(
        static, num_slots=tuning.num_slots(max_num_seqs, num_tokens, static.tokens_per_tile)
    )
    metadata = (kv_lens, page_indices, cu_q_lens, num_seqs)
    args = (q, kv_cache, *(x.astype(jnp.int32) for x in metadata))
    if num_splits == 1:
        return call(*args)
    out_parts, lse_parts = call(*args)
    return tiles.merge_splits(out_parts, lse_parts, q.dtype)


def _kernel(q_ref, kv_ref, kv_lens_ref, pages_ref, cu_ref, num_seqs_ref, *refs, st: _Static):
    """One CTA: one q tile (slot) of one kv head, one split of its keys."""
    num_splits, stages, block_kv = st.num_splits, st.num_stages, st.block_kv
    group, tq = st.group, st.tokens_per_tile
    o_ref, lse_ref = (refs[0], None) if num_splits == 1 else refs[:2]
    (q_stage, q_smem, k_smem, v_smem, lse_stage), ready, free = refs[-3:]
    k_ready, v_ready, q_ready = ready
    k_free, v_free = free

    kv_head = lax.axis_index("kv_head")
    split = lax.axis_index("split")
    tile = tiles.find_tile(
        lax.axis_index("slot"),
        lambda i: cu_ref[i],
        lambda i: kv_lens_ref[i],
        num_seqs_ref[0],
        max_num_seqs=kv_lens_ref.shape[0],
        num_tokens=st.num_tokens,
        tokens_per_tile=tq,
        sliding_window=st.sliding_window,
    )
    seq, t0, num, pos0, kv_hi = tile.seq, tile.t0, tile.num, tile.pos0, tile.kv_hi
    first_block, num_blocks = tiles.split_blocks(tile.kv_lo, kv_hi, split, num_splits, block_kv)
    heads = pl.ds(kv_head * group, group)
    wg = lax.axis_index("wg")

    @pl.when(wg == 0)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        # Token i's G q heads are one contiguous [G, H] box of q; they land in rows
        # i*G .. i*G+G-1 of a plain buffer (TMA into the swizzled wgmma layout would need
        # 8-row-aligned boxes), then move to the swizzled copy through registers. Tokens
        # past T are zero-filled by the TMA unit; other sequences' rows are never stored.
        for i in range(tq):
            plgpu.copy_gmem_to_smem(
                q_ref.at[t0 + i, heads], q_stage.at[pl.ds(i * group, group)], q_ready.at[0]
            )
        plgpu.barrier_wait(q_ready.at[0])
        q_smem[...] = q_stage[...]
        plgpu.commit_smem()  # generic-proxy writes, read next by wgmma (async proxy)
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        m_i = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), row_layout)
        l_i = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), row_layout)
        acc = plgpu.layout_cast(jnp.zeros((ROWS, st.head_dim), jnp.float32), plgpu.Layout.WGMMA)

        @pl.when(num_blocks > 0)
        def _():
            plgpu.barrier_wait(k_ready.at[0])

        def step_fn(step, carry, *, masked: bool):
            acc, m_i, l_i = carry
            buf = lax.rem(step, jnp.int32(stages))

            def qk(s_ref):
                plgpu.wgmma(s_ref, q_smem, k_smem.at[buf].transpose((1, 0)))
                return s_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), jnp.float32))  # [64, bkv]
            plgpu.barrier_arrive(k_free.at[buf])
            # Logits are taken in log2 units, x * scale * log2(e), so that p = exp2(x*c - m)
            # is one FMA and one exp2 per element; with a soft cap they are capped first.
            scale = st.sm_scale * LOG2E
            if st.soft_cap is not None:
                s = jnp.tanh(s * (st.sm_scale / st.soft_cap)) * (st.soft_cap * LOG2E)
                scale = 1.0
            shape = (ROWS, block_kv)
            if masked:
                row = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                key = (first_block + step) * block_kv + col
                q_pos = pos0 + lax.div(row, jnp.int32(group))  # row i*G + g is token t0 + i
                visible = key <= q_pos
                if st.sliding_window is not None:
                    visible = visible & (key > q_pos - st.sliding_window)
                s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1) * scale)
            # A row with nothing visible yet keeps m = -inf; exp2(-inf - 0) = 0 keeps its
            # p and alpha at 0 instead of NaN.
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp2(m_i - m_use)
            p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_use, shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p = p.astype(st.dtype)
            plgpu.barrier_wait(v_ready.at[buf])

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p, v_smem.at[buf])

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[buf])

            @pl.when(step + 1 < num_blocks)
            def _():
                plgpu.barrier_wait(k_ready.at[lax.rem(step + 1, jnp.int32(stages))])

            return acc, m_new, l_i

        # Blocks whose keys all precede the tile's first position are visible to every
        # row: no mask (decode: all blocks but the last). A window masks every block.
        num_full = jnp.int32(0)
        if st.sliding_window is None:
            num_full = jnp.clip(lax.div(pos0 + 1, jnp.int32(block_kv)) - first_block, 0, num_blocks)
        carry = (acc, m_i, l_i)
        carry = lax.fori_loop(0, num_full, functools.partial(step_fn, masked=False), carry)
        carry = lax.fori_loop(num_full, num_blocks, functools.partial(step_fn, masked=True), carry)
        acc, m_i, l_i = carry
        l_safe = jnp.where(l_i > 0, l_i, 1.0)
        acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
        o_stage = q_stage  # free since the swizzled copy was made
        o_stage[...] = acc.astype(o_stage.dtype)
        if lse_ref is not None:
            lse_stage[...] = jnp.where(l_i > 0, m_i + jnp.log2(l_safe), -jnp.inf)
        plgpu.commit_smem()
        for i in range(tq):
            rows = pl.ds(i * group, group)
            token = t0 + i
            if lse_ref is None:
                plgpu.copy_smem_to_gmem(o_stage.at[rows], o_ref.at[token, heads], i < num)
            else:
                plgpu.copy_smem_to_gmem(o_stage.at[rows], o_ref.at[split, token, heads], i < num)
                plgpu.copy_smem_to_gmem(
                    lse_stage.at[rows], lse_ref.at[split, token, heads], i < num
                )
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        ppb, page_size = st.pages_per_block, st.page_size
        last_col = lax.div(jnp.maximum(kv_hi - 1, 0), jnp.int32(page_size))

        def pages_of(step):
            block = first_block + step
            return [pages_ref[seq, jnp.minimum(block * ppb + j, last_col)] for j in range(ppb)]

        def fetch(pages, half, smem, barrier, buf):
            for j, page in enumerate(pages):
                plgpu.copy_gmem_to_smem(
                    kv_ref.at[page, :, 2 * kv_head + half],  # [L, H]
                    smem.at[buf, pl.ds(j * page_size, page_size)],
                    barrier.at[buf],
                )

        for i in range(stages):

            @pl.when(i < num_blocks)
            def _(i=i):
                pages = pages_of(i)
                fetch(pages, 0, k_smem, k_ready, i)
                fetch(pages, 1, v_smem, v_ready, i)

        @pl.loop(0, jnp.maximum(num_blocks - stages, 0))
        def _(step):
            buf = lax.rem(step, jnp.int32(stages))
            pages = pages_of(step + stages)  # loads overlap the wait
            plgpu.barrier_wait(k_free.at[buf])
            fetch(pages, 0, k_smem, k_ready, buf)
            plgpu.barrier_wait(v_free.at[buf])
            fetch(pages, 1, v_smem, v_ready, buf)


@functools.cache
def _build(st: _Static, *, num_slots: int):
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kv_buffer = (st.num_stages, st.block_kv, st.head_dim)
    split = st.num_splits > 1

    def entry(*refs):
        smem = (
            plgpu.SMEM((ROWS, st.head_dim), st.dtype),
            plgpu.SMEM((ROWS, st.head_dim), st.dtype, transforms=transforms),
            plgpu.SMEM(kv_buffer, st.dtype, transforms=transforms),
            plgpu.SMEM(kv_buffer, st.dtype, transforms=transforms),
            plgpu.SMEM((ROWS,), jnp.float32) if split else None,
        )
        ready = (
            plgpu.Barrier(num_arrivals=st.pages_per_block, num_barriers=st.num_stages),
            plgpu.Barrier(num_arrivals=st.pages_per_block, num_barriers=st.num_stages),
            plgpu.Barrier(num_arrivals=st.tokens_per_tile, num_barriers=1),
        )
        free = (
            plgpu.Barrier(num_arrivals=1, num_barriers=st.num_stages),
            plgpu.Barrier(num_arrivals=1, num_barriers=st.num_stages),
        )
        pl.run_scoped(
            lambda *scratch: _kernel(*refs, *scratch, st=st),
            smem,
            ready,
            free,
            collective_axes="wg",
        )

    num_q_heads = st.num_kv_heads * st.group
    if split:
        out_type = (
            jax.ShapeDtypeStruct(
                (st.num_splits, st.num_tokens, num_q_heads, st.head_dim), st.dtype
            ),
            jax.ShapeDtypeStruct((st.num_splits, st.num_tokens, num_q_heads), jnp.float32),
        )
    else:
        out_type = jax.ShapeDtypeStruct((st.num_tokens, num_q_heads, st.head_dim), st.dtype)
    return plgpu.kernel(
        entry,
        out_type=out_type,
        # Pallas makes the last axis the fastest-varying CUDA block index.
        grid=(num_slots, st.num_kv_heads, st.num_splits),
        grid_names=("slot", "kv_head", "split"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup
        ),
    )
