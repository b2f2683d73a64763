"""The Mosaic GPU kernel (pallas_kernels/gpu/) against the pure-JAX reference.

On the H200 (`-m gpu`, JAX_PLATFORMS=cuda) the kernel runs on ragged batches of decode
tokens, prefill chunks and both, page sizes 16..128, with and without split-K.

On CPU, where Mosaic GPU cannot execute (its interpreter does not emulate wgmma), the
tests cover everything around it: the tile metadata, split ranges and split merge that
the kernel relies on (through a NumPy emulation of what each CTA computes, checked
against the reference), the dispatcher's choice between kernel and reference, and that
the kernel traces and lowers for CUDA (jax.export with platforms=["cuda"] runs the Mosaic
GPU lowering on a CPU-only machine).
"""

import dataclasses
import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rpa_cases import make_inputs

from tandem.pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
from tandem.pallas_kernels.gpu import (
    merge_splits,
    num_splits,
    ragged_paged_attention_gpu,
    split_blocks,
    tile_metadata,
)
from tandem.pallas_kernels.gpu.tuning import tokens_per_tile

rpa_module = importlib.import_module("tandem.pallas_kernels.ragged_paged_attention")
gpu_package = importlib.import_module("tandem.pallas_kernels.gpu")

on_gpu = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="needs an NVIDIA Hopper GPU (run with JAX_PLATFORMS=cuda on the H200)",
)

# bf16: P is fed to the P @ V wgmma in bf16 (2^-9 relative per weight) and both sides
# round the output to bf16 (2^-8 relative at |out| up to ~3), as in test_tpu_kernel.py.
BF16 = dict(atol=2e-2, rtol=2e-2)
F32 = dict(atol=2e-5, rtol=2e-5)

# (q_len, kv_len) per sequence: length 1, page multiples, chunks that cross q tiles
# (16 tokens at G=4), contexts of many kv blocks so the stage ring wraps.
BATCHES = {
    "decode": [(1, 1), (1, 16), (1, 17), (1, 700), (1, 1500), (1, 128)],
    "mixed": [(1, 1), (1, 900), (20, 64), (9, 133), (1, 37), (40, 1300)],
    "prefill": [(30, 30), (1, 1), (6, 128), (70, 1071)],
}


def reference(inputs, **kw):
    return ragged_paged_attention_reference(*inputs.args(), **kw)


def batch(kind, *, page_size, group, head_dim=128, num_kv_heads=2, dtype=jnp.bfloat16, seed=0):
    return make_inputs(
        BATCHES[kind],
        page_size=page_size,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        dtype=dtype,
        seed=seed,
    )


# CPU: tile metadata, split ranges, merge, and an emulation of the kernel's CTAs.


def token_owners(inputs):
    """[T] sequence of each token (-1: padding) and its position, by brute force."""
    cu = np.asarray(inputs.cu_q_lens)
    kv_lens = np.asarray(inputs.kv_lens)
    num_tokens = inputs.q.shape[0]
    owner, pos = np.full(num_tokens, -1), np.zeros(num_tokens, int)
    for s in range(int(inputs.num_seqs[0])):
        for t in range(cu[s], cu[s + 1]):
            owner[t], pos[t] = s, kv_lens[s] - (cu[s + 1] - cu[s]) + (t - cu[s])
    return owner, pos


def tile_rows(tiles):
    fields = (tiles.seq, tiles.t0, tiles.num, tiles.pos0, tiles.kv_lo, tiles.kv_hi)
    return np.stack([np.asarray(f) for f in fields], axis=-1).tolist()  # [..., slot, field]


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("kind", list(BATCHES))
def test_tiles_cover_every_token_once(kind, group):
    inputs = batch(kind, page_size=16, group=group, head_dim=64, dtype=jnp.float32)
    tq = tokens_per_tile(group)
    # Jitted: one compilation costs less than running (and compiling) it op by op.
    find_tiles = functools.partial(
        tile_metadata, num_tokens=inputs.q.shape[0], tokens_per_tile=tq, sliding_window=5
    )
    tiles = jax.jit(find_tiles)(inputs.kv_lens, inputs.cu_q_lens, inputs.num_seqs)
    max_num_seqs, num_tokens = inputs.kv_lens.shape[0], inputs.q.shape[0]
    assert tiles.t0.shape == (max_num_seqs + 1 + num_tokens // tq,)
    owner, pos = token_owners(inputs)
    seen = np.zeros(num_tokens, int)
    for seq, t0, num, pos0, kv_lo, kv_hi in tile_rows(tiles):
        assert 0 <= num <= tq
        tokens = np.arange(t0, t0 + num)
        seen[tokens] += 1
        if num and owner[t0] >= 0:
            assert (owner[tokens] == seq).all()  # a tile never spans two sequences
            assert (pos[tokens] == pos0 + np.arange(num)).all()
            assert (kv_hi, kv_lo) == (pos0 + num, max(pos0 - 4, 0))
        elif num:
            assert (owner[tokens] == -1).all() and kv_hi == 0  # padding: no keys
    assert (seen == 1).all()


def tiles_of_cases(cases, *, max_num_seqs, num_tokens, tokens_per_tile, guess):
    """tile_metadata of same-shaped cases (lists of q_lens and kv_lens) in one jitted, vmapped
    call: one compilation per shape instead of one per case."""
    cu = np.zeros((len(cases), max_num_seqs + 1), np.int32)
    kv = np.zeros((len(cases), max_num_seqs), np.int32)
    for i, (q_lens, kv_lens) in enumerate(cases):
        cu[i, 1 : len(q_lens) + 1] = np.cumsum(q_lens)
        cu[i, len(q_lens) + 1 :] = cu[i, len(q_lens)]
        kv[i, : len(q_lens)] = kv_lens
    num_live = np.array([[len(q_lens)] for q_lens, _ in cases], np.int32)
    fn = functools.partial(
        tile_metadata,
        num_tokens=num_tokens,
        tokens_per_tile=tokens_per_tile,
        sliding_window=None,
        guess=guess,
    )
    tiles = jax.jit(jax.vmap(fn))(jnp.asarray(kv), jnp.asarray(cu), jnp.asarray(num_live))
    return tile_rows(tiles)  # per case, per slot


@pytest.mark.parametrize("group", [1, 4, 7])
def test_the_decode_guess_finds_the_same_tiles_as_the_search(group):
    """find_tile guesses each slot's owner as if every sequence had one token and falls
    back to a binary search when the guess is wrong: both must agree on decode batches
    (full and partly empty), on ragged batches, and on padding tokens past the last."""
    tq = tokens_per_tile(group)
    rs = np.random.RandomState(group)

    def with_kv_lens(q_lens):  # each sequence has 0..499 tokens before its new ones
        return q_lens, (np.asarray(q_lens, int) + rs.randint(0, 500, len(q_lens))).tolist()

    # (q_lens, max_num_seqs, num_tokens)
    decodes = [
        ([1] * 9, 9, 9),  # all decodes
        ([1] * 5, 9, 7),  # decodes, 4 empty sequence slots and 2 padding tokens
        ([1] * 3 + [0] * 2 + [1] * 2, 7, 7),  # sequences of no tokens among decodes
    ]
    batches = [([with_kv_lens(q_lens)], s, t) for q_lens, s, t in decodes]
    # Ragged: 1..9 live sequences of 9 slots share about one token each (the guess's case)
    # or 3 tiles' worth, cut at random points (some sequences get none, some span tiles),
    # then 0..4 padding tokens. Same-shaped cases run in one call.
    for num_tokens in (13, 3 * tq + 4):
        ragged = []
        for _ in range(24):
            used = num_tokens - rs.randint(0, 5)
            cuts = np.sort(rs.randint(0, used + 1, size=rs.randint(0, 9)))
            ragged.append(with_kv_lens(np.diff([0, *cuts, used]).tolist()))
        batches.append((ragged, 9, num_tokens))
    for cases, max_num_seqs, num_tokens in batches:
        kw = dict(max_num_seqs=max_num_seqs, num_tokens=num_tokens, tokens_per_tile=tq)
        guessed = tiles_of_cases(cases, **kw, guess=True)
        searched = tiles_of_cases(cases, **kw, guess=False)
        for (q_lens, _), g, s in zip(cases, guessed, searched):
            assert g == s, (q_lens, max_num_seqs, num_tokens)


def test_split_blocks_partition_the_key_range():
    rs = np.random.RandomState(0)
    for _ in range(200):
        lo = int(rs.randint(0, 3000))
        hi = lo + int(rs.randint(0, 3000))
        splits, block = int(rs.choice([1, 2, 3, 4, 16])), int(rs.choice([64, 128]))
        runs = [tuple(map(int, split_blocks(lo, hi, p, splits, block))) for p in range(splits)]
        blocks = [b for first, n in runs for b in range(first, first + n)]
        assert blocks == list(range(lo // block, -(-hi // block)))  # in order, once each
        sizes = [n for _, n in runs]
        assert max(sizes) - min(sizes) <= max(sizes[0], 1)


def test_num_splits_fill_the_gpu_only_when_needed():
    decode = dict(num_kv_heads=8, group=4, max_kv_blocks=32)  # 4k context, 128-key blocks
    # B=8: 8 heads x 9 slots = 72 CTAs -> 2 splits (144 >= 132 SMs: one wave).
    assert num_splits(max_num_seqs=8, num_tokens=8, **decode) == 2
    assert num_splits(max_num_seqs=64, num_tokens=64, **decode) == 1
    # B=2: 24 CTAs want 8 splits; 32 blocks allow 8 (4 blocks each), 8 blocks only 2.
    assert num_splits(max_num_seqs=2, num_tokens=2, **decode) == 8
    assert num_splits(max_num_seqs=2, num_tokens=2, **{**decode, "max_kv_blocks": 8}) == 2
    assert num_splits(max_num_seqs=8, num_tokens=8, **{**decode, "group": 7}) == 1  # G % 4


def test_merge_splits_equals_one_softmax():
    rs = np.random.RandomState(1)
    logits, values = rs.randn(3, 5, 40) * 4, rs.randn(40, 8)  # [T, N, keys], [keys, H]
    cuts = [0, 13, 13, 40]  # the middle split is empty
    outs, lses = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        part = logits[..., a:b]
        if b == a:
            outs.append(np.zeros((3, 5, 8)))
            lses.append(np.full((3, 5), -np.inf))
            continue
        m = part.max(-1, keepdims=True)
        e = np.exp(part - m)
        outs.append(e @ values[a:b] / e.sum(-1, keepdims=True))
        lses.append((m[..., 0] + np.log(e.sum(-1))) * math.log2(math.e))
    merged = merge_splits(jnp.asarray(np.stack(outs)), jnp.asarray(np.stack(lses)), jnp.float32)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    expected = probs @ values / probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)
    nothing = merge_splits(jnp.zeros((2, 1, 1, 8)), jnp.full((2, 1, 1), -jnp.inf), jnp.float32)
    assert not np.asarray(nothing).any()  # padding rows: no split saw a key


def emulate_kernel(inputs, *, sm_scale, sliding_window, soft_cap, splits, block_kv):
    """What the CTAs compute, in float64: per tile slot, kv head and split, the partial
    softmax over the split's blocks (pages fetched as the producer does, clamped to the
    tile's last page), written row by row; then the kernel's merge."""
    q = np.asarray(inputs.q, np.float64)
    kv = np.asarray(inputs.kv_cache, np.float64)
    pages = np.asarray(inputs.page_indices)
    num_tokens, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = kv.shape[1], kv.shape[2] // 2
    group = num_q_heads // num_kv_heads
    meta = tile_metadata(
        inputs.kv_lens,
        inputs.cu_q_lens,
        inputs.num_seqs,
        num_tokens=num_tokens,
        tokens_per_tile=tokens_per_tile(group),
        sliding_window=sliding_window,
    )
    out = np.full((splits, num_tokens, num_q_heads, head_dim), np.nan)
    lse = np.full((splits, num_tokens, num_q_heads), np.nan)
    for seq, t0, num, pos0, kv_lo, kv_hi in tile_rows(meta):
        for p in range(splits):
            first, n = map(int, split_blocks(kv_lo, kv_hi, p, splits, block_kv))
            keys = np.arange(first * block_kv, (first + n) * block_kv)
            cols = np.minimum(keys // page_size, max(kv_hi - 1, 0) // page_size)
            rows = kv[pages[seq, cols], keys % page_size]  # [keys, 2K, H]
            k, v = rows[:, 0::2], rows[:, 1::2]
            for i in range(num):
                t = t0 + i
                s = np.einsum("kgh,skh->kgs", q[t].reshape(num_kv_heads, group, -1), k)
                s = s * sm_scale
                if soft_cap:
                    s = soft_cap * np.tanh(s / soft_cap)
                visible = keys <= pos0 + i
                if sliding_window:
                    visible &= keys > pos0 + i - sliding_window
                if not visible.any():
                    out[p, t], lse[p, t] = 0.0, -np.inf
                    continue
                s = np.where(visible, s, -np.inf)
                m = s.max(-1, keepdims=True)
                e = np.exp(s - m)
                o = np.einsum("kgs,skh->kgh", e, v) / e.sum(-1)[..., None]
                out[p, t] = o.reshape(num_q_heads, -1)
                lse[p, t] = ((m[..., 0] + np.log(e.sum(-1))) * math.log2(math.e)).reshape(-1)
    assert not np.isnan(out).any() and not np.isnan(lse).any()  # every row written
    return merge_splits(jnp.asarray(out, jnp.float32), jnp.asarray(lse, jnp.float32), jnp.float32)


@pytest.mark.parametrize(
    "kind,group,splits,window,cap",
    [
        ("decode", 4, 4, None, None),
        ("mixed", 4, 3, None, 5.0),
        ("prefill", 8, 1, 20, None),
        ("mixed", 7, 1, 50, None),
        ("decode", 1, 2, 100, None),
    ],
)
def test_emulated_ctas_match_reference(kind, group, splits, window, cap):
    inputs = batch(kind, page_size=16, group=group, head_dim=64, dtype=jnp.float32)
    kw = dict(sm_scale=1.0 if cap else 0.125, sliding_window=window, soft_cap=cap)
    got = emulate_kernel(inputs, splits=splits, block_kv=64, **kw)
    np.testing.assert_allclose(got, reference(inputs, **kw), **F32)


# CPU: the kernel traces and lowers for CUDA; bad arguments raise ValueError.


@pytest.mark.parametrize(
    "page_size,group,head_dim,splits,kw",
    [(16, 4, 128, 4, {}), (128, 8, 64, 1, dict(sliding_window=20, soft_cap=5.0))],
)
def test_kernel_lowers_for_cuda(page_size, group, head_dim, splits, kw):
    inputs = batch("mixed", page_size=page_size, group=group, head_dim=head_dim)
    fn = jax.jit(lambda *a: ragged_paged_attention_gpu(*a, sm_scale=0.1, num_splits=splits, **kw))
    module = jax.export.export(fn, platforms=["cuda"])(*inputs.args()).mlir_module()
    assert "mosaic_gpu" in module


@pytest.mark.parametrize(
    "shape,kw,match",
    [
        (dict(dtype=jnp.float32), {}, "bf16 or f16"),
        (dict(head_dim=96), {}, "head_dim"),
        (dict(page_size=12), {}, "page size"),
        (dict(group=2), dict(num_splits=2), "num_splits"),
        ({}, dict(block_kv=96), "block_kv"),
        ({}, dict(num_stages=1), "num_stages"),
    ],
)
def test_bad_arguments_raise_value_error(shape, kw, match):
    inputs = batch("decode", **{**dict(page_size=16, group=4, head_dim=128), **shape})
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention_gpu(*inputs.args(), sm_scale=0.1, **kw)


# CPU: which path the public entry point takes on a GPU backend.


@pytest.fixture
def fake_hopper(monkeypatch):
    """The backend reported as a 9.0 GPU, the kernel replaced by a recorder that runs the
    reference (so the outputs still check)."""
    calls = []
    monkeypatch.setattr(rpa_module.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(rpa_module, "_compute_capability", lambda: "9.0")
    monkeypatch.setattr(
        gpu_package,
        "ragged_paged_attention_gpu",
        lambda *a, **kw: calls.append(kw) or ragged_paged_attention_reference(*a, **kw),
    )
    return calls


def test_gpu_backend_dispatches_supported_inputs_to_kernel(fake_hopper):
    inputs = batch("mixed", page_size=16, group=4)
    out = ragged_paged_attention(*inputs.args(), sm_scale=0.1, sliding_window=8)
    assert fake_hopper == [dict(sm_scale=0.1, sliding_window=8, soft_cap=None)]
    np.testing.assert_allclose(
        out.astype(np.float32),
        reference(inputs, sm_scale=0.1, sliding_window=8).astype(np.float32),
        **BF16,
    )


@pytest.mark.parametrize("case", ["f32", "head_dim_96", "ampere"])
def test_gpu_backend_falls_back_to_reference(fake_hopper, monkeypatch, case):
    shape = dict(page_size=16, group=4, head_dim=128)
    if case == "f32":
        shape["dtype"] = jnp.float32
    if case == "head_dim_96":
        shape["head_dim"] = 96
    if case == "ampere":
        monkeypatch.setattr(rpa_module, "_compute_capability", lambda: "8.0")
    inputs = batch("decode", **shape)
    ragged_paged_attention(*inputs.args(), sm_scale=0.1)
    assert fake_hopper == []


# GPU: the kernel itself.


@dataclasses.dataclass(frozen=True)
class Config:
    page_size: int
    group: int
    head_dim: int = 128
    splits: int | None = None  # None: tuning.py's choice
    window: int | None = None
    cap: float | None = None
    dtype: type = jnp.bfloat16


GPU_CONFIGS = {
    "L16-G4": Config(16, 4),
    "L16-G4-split4": Config(16, 4, splits=4),
    "L32-G8-H64-split2": Config(32, 8, head_dim=64, splits=2),
    "L64-G4-window-cap": Config(64, 4, window=100, cap=30.0),
    "L128-G4-split3": Config(128, 4, splits=3),
    "L16-G1-f16": Config(16, 1, dtype=jnp.float16),
    "L64-G7": Config(64, 7),
    "L32-G8-split8": Config(32, 8, splits=8),
    "L8-G4-window": Config(8, 4, window=33, splits=2),
}


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize("name", list(GPU_CONFIGS))
def test_kernel_matches_reference(name, kind):
    c = GPU_CONFIGS[name]
    inputs = batch(kind, page_size=c.page_size, group=c.group, head_dim=c.head_dim, dtype=c.dtype)
    kw = dict(sm_scale=c.head_dim**-0.5, sliding_window=c.window, soft_cap=c.cap)
    out = jax.jit(lambda *a: ragged_paged_attention_gpu(*a, num_splits=c.splits, **kw))(
        *inputs.args()
    )
    assert out.dtype == c.dtype and out.shape == inputs.q.shape
    expected = reference(inputs, **kw)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), **BF16
    )
    num_real = int(inputs.cu_q_lens[int(inputs.num_seqs[0])])
    assert not np.asarray(out[num_real:], np.float32).any()  # padding rows come back 0


@pytest.mark.gpu
@on_gpu
def test_public_entry_point_runs_kernel_on_hopper():
    inputs = batch("mixed", page_size=16, group=4, seed=3)
    fn = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.1))
    assert "mosaic_gpu" in fn.lower(*inputs.args()).as_text()
    np.testing.assert_allclose(
        np.asarray(fn(*inputs.args()), np.float32),
        np.asarray(reference(inputs, sm_scale=0.1), np.float32),
        **BF16,
    )
