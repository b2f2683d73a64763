"""The pure-JAX reference equals a dense NumPy oracle (rpa_cases.dense_attention), and the
public wrapper rejects each malformed argument with a ValueError naming it."""

import jax.numpy as jnp
import numpy as np
import pytest
from rpa_cases import dense_attention, make_inputs

from tandem.pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference

# f32: the reference and the oracle differ only in summation order and f32 vs f64
# accumulation. bf16: both start from the same bf16 inputs and compute in f32/f64, so the
# gap is the final rounding of the output to bf16: half an ulp, 2^-9 relative, at |out|
# up to ~3 (a convex mix of N(0, 1) values), i.e. < 6e-3; 1e-2 leaves room.
TOLERANCE = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def mixed(page_size):
    """Ragged mixed batch: first token, decode at an exact page multiple, a fresh prompt of
    exactly one page, a prefill chunk continuing a long context, decode past a boundary."""
    return [(1, 1), (1, 2 * page_size), (page_size, page_size), (7, 2 * page_size + 5), (1, 37)]


def decode_only(page_size):
    return [(1, 1), (1, page_size), (1, page_size + 1), (1, 3 * page_size), (1, 5)]


def prefill_only(page_size):
    """Fresh prompts (q_len == kv_len) and chunks of longer prompts."""
    return [(page_size, page_size), (9, 9), (1, 1), (6, 2 * page_size), (11, page_size + 11)]


def check(seqs, *, dtype, page_size, group, head_dim, num_kv_heads=2, **kwargs):
    inputs = make_inputs(
        seqs,
        page_size=page_size,
        num_kv_heads=num_kv_heads,
        group=group,
        head_dim=head_dim,
        dtype=dtype,
    )
    sm_scale = kwargs.pop("sm_scale", head_dim**-0.5)
    out = ragged_paged_attention_reference(*inputs.args(), sm_scale=sm_scale, **kwargs)
    expected = dense_attention(inputs, sm_scale=sm_scale, **kwargs)
    assert out.dtype == dtype and out.shape == inputs.q.shape
    # The padding rows hold NaN in q; they come back 0 and poison nothing.
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_batch_matches_dense(dtype, page_size, group, head_dim):
    check(mixed(page_size), dtype=dtype, page_size=page_size, group=group, head_dim=head_dim)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("batch", [decode_only, prefill_only, mixed])
def test_batch_kinds_match_dense(dtype, batch):
    check(batch(16), dtype=dtype, page_size=16, group=4, head_dim=64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
# 1: a token sees only itself; 5: shorter than a page; 1000: wider than any context.
@pytest.mark.parametrize("sliding_window", [1, 5, 1000])
def test_sliding_window_matches_dense(dtype, sliding_window):
    check(
        mixed(16),
        dtype=dtype,
        page_size=16,
        group=4,
        head_dim=64,
        sliding_window=sliding_window,
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("sliding_window", [None, 20])
def test_soft_cap_matches_dense(dtype, sliding_window):
    # sm_scale 1 makes logits ~N(0, 64), so the cap of 5 bends most of them.
    check(
        mixed(16),
        dtype=dtype,
        page_size=16,
        group=4,
        head_dim=64,
        sm_scale=1.0,
        soft_cap=5.0,
        sliding_window=sliding_window,
    )


def test_window_of_one_returns_own_value():
    """Hand case: with sliding_window=1 each query sees only its own key, so the output is
    that position's V for every q head of the group, whatever q is."""
    inputs = make_inputs([(3, 10)], page_size=4, num_kv_heads=1, group=2, head_dim=8)
    out = ragged_paged_attention_reference(*inputs.args(), sm_scale=1.0, sliding_window=1)
    kv = np.asarray(inputs.kv_cache)
    pages = np.asarray(inputs.page_indices)[0]
    for t, pos in enumerate([7, 8, 9]):  # positions kv_len - q_len + t
        v = kv[pages[pos // 4], pos % 4, 1]
        np.testing.assert_allclose(np.asarray(out)[t], np.stack([v, v]), rtol=1e-6)


# Validation: each malformed argument raises ValueError before anything is computed.


def good_args():
    inputs = make_inputs([(2, 5), (1, 3)], page_size=4, num_kv_heads=2, group=2, head_dim=8)
    return dict(
        q=inputs.q,
        kv_cache=inputs.kv_cache,
        kv_lens=inputs.kv_lens,
        page_indices=inputs.page_indices,
        cu_q_lens=inputs.cu_q_lens,
        num_seqs=inputs.num_seqs,
    )


def call(sm_scale=0.5, **overrides):
    args = {**good_args(), **overrides}
    return ragged_paged_attention(**args, sm_scale=sm_scale)


def test_good_arguments_pass_validation():
    assert call().shape == good_args()["q"].shape


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("q", lambda a: a["q"][0], "q must be"),
        ("kv_cache", lambda a: a["kv_cache"][0], "kv_cache must be"),
        ("kv_cache", lambda a: a["kv_cache"][:, :, :3], "kv_cache axis 2"),
        ("kv_cache", lambda a: a["kv_cache"][..., :4], "kv_cache head dim"),
        ("q", lambda a: a["q"][:, :3], r"q heads \(3\) must be a multiple of kv heads \(2\)"),
        ("kv_lens", lambda a: a["kv_lens"][:2], "kv_lens"),
        ("page_indices", lambda a: a["page_indices"][0], "page_indices"),
        ("cu_q_lens", lambda a: a["cu_q_lens"][:2], "cu_q_lens"),
        ("cu_q_lens", lambda a: a["cu_q_lens"][None], "cu_q_lens"),
        ("num_seqs", lambda a: jnp.array([2, 0], jnp.int32), "num_seqs"),
        ("kv_lens", lambda a: a["kv_lens"].astype(jnp.float32), "kv_lens must be an integer"),
        (
            "page_indices",
            lambda a: a["page_indices"].astype(jnp.float32),
            "page_indices must be an integer",
        ),
        ("cu_q_lens", lambda a: a["cu_q_lens"].astype(jnp.float32), "cu_q_lens must be an integer"),
        ("num_seqs", lambda a: a["num_seqs"].astype(jnp.float32), "num_seqs must be an integer"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_array_raises_value_error_naming_it(name, bad, match):
    with pytest.raises(ValueError, match=match):
        call(**{name: bad(good_args())})


@pytest.mark.parametrize("name", ["sliding_window", "soft_cap"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_option_raises_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=name):
        ragged_paged_attention(**good_args(), sm_scale=0.5, **{name: value})


@pytest.mark.parametrize("batch", [decode_only, prefill_only, mixed])
@pytest.mark.parametrize(
    "kwargs", [{}, dict(sliding_window=5), dict(soft_cap=3.0)], ids=["plain", "window", "cap"]
)
def test_the_per_sequence_loop_also_matches_dense(batch, kwargs):
    """The reference gathers keys per token while that fits `by_token_bytes` (every other
    test here); above it, it loops over sequences: the same oracle holds for that path."""
    inputs = make_inputs(
        batch(16), page_size=16, num_kv_heads=2, group=4, head_dim=64, dtype=jnp.float32
    )
    out = ragged_paged_attention_reference(
        *inputs.args(), sm_scale=0.125, by_token_bytes=0, **kwargs
    )
    expected = dense_attention(inputs, sm_scale=0.125, **kwargs)
    np.testing.assert_allclose(np.asarray(out), expected, **TOLERANCE[jnp.float32])
