"""The Mosaic TPU kernel, run by the TPU interpreter on CPU, equals the pure-JAX reference.

The interpreter simulates VMEM, the HBM->VMEM DMAs and their semaphores, and fills
uninitialised VMEM with NaN, so a kernel that reads a buffer slot it never fetched, or
lets a padding row (NaN in q) leak, fails here. Every case runs in the interpreter; none
is skipped.

Compiling a kernel for the interpreter takes seconds, running it a fraction of one: each
config is compiled once and all its batches share one shape (fixed token, sequence and
page counts), so they hit the jit cache.
"""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from rpa_cases import make_inputs

from tandem.pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
from tandem.pallas_kernels.tpu import block_sizes, ragged_paged_attention_tpu

# The module, not the function of the same name that the package re-exports.
rpa_module = importlib.import_module("tandem.pallas_kernels.ragged_paged_attention")

# f32: online vs one-pass softmax, f32 throughout: ~1e-6. bf16: the kernel feeds p to the
# p @ V matmul in bf16 (2^-9 relative per weight, as on the MXU) and both sides round the
# output to bf16 (one ulp apart at most: 2^-8 relative at |out| up to ~3), so 2e-2.
TOLERANCE = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
NUM_TOKENS = 48  # shared T of all batches; rows past the batch's tokens are padding
MAX_NUM_SEQS = 6

# (q_len, kv_len) per sequence, by page size: lengths of 1, exact page multiples, q chunks
# that cross q blocks, contexts that span several kv blocks.
BATCHES = {
    16: {
        "mixed": [(1, 1), (1, 32), (16, 16), (9, 45), (1, 37)],
        "decode": [(1, 1), (1, 16), (1, 17), (1, 48), (1, 5)],
        "prefill": [(16, 16), (9, 9), (1, 1), (6, 32), (11, 27)],
    },
    64: {
        "mixed": [(1, 1), (1, 128), (20, 64), (9, 133), (1, 37)],
        "decode": [(1, 1), (1, 64), (1, 65), (1, 192), (1, 5)],
        "prefill": [(30, 30), (1, 1), (6, 128), (7, 71)],
    },
}


@dataclasses.dataclass(frozen=True)
class Config:
    dtype: type
    page_size: int
    group: int
    head_dim: int
    sliding_window: int | None = None
    soft_cap: float | None = None
    num_queries_per_block: int = 8  # small, so sequences and q blocks cross
    num_pages_per_block: int = 2
    num_kv_heads: int = 2

    @property
    def sm_scale(self):
        # With a soft cap, unscaled logits (~N(0, H)) so that the cap bends them.
        return 1.0 if self.soft_cap else self.head_dim**-0.5


CONFIGS = {
    "f32-L16-G1-H128": Config(jnp.float32, 16, 1, 128),
    "f32-L16-G4-H64-window5": Config(jnp.float32, 16, 4, 64, sliding_window=5),
    "f32-L64-G4-H64-softcap-1page": Config(
        jnp.float32, 64, 4, 64, soft_cap=5.0, num_pages_per_block=1
    ),
    "bf16-L16-G4-H64-bq16": Config(jnp.bfloat16, 16, 4, 64, num_queries_per_block=16),
    "bf16-L64-G1-H128-window20-softcap": Config(
        jnp.bfloat16, 64, 1, 128, sliding_window=20, soft_cap=5.0
    ),
    "bf16-L16-G8-H128-window20-1page": Config(
        jnp.bfloat16, 16, 8, 128, sliding_window=20, num_pages_per_block=1
    ),
}


def batch_inputs(config, kind, seed=0):
    batches = BATCHES[config.page_size]
    pages = [[-(-kv_len // config.page_size) for _, kv_len in seqs] for seqs in batches.values()]
    return make_inputs(
        batches[kind],
        page_size=config.page_size,
        num_kv_heads=config.num_kv_heads,
        group=config.group,
        head_dim=config.head_dim,
        dtype=config.dtype,
        num_tokens=NUM_TOKENS,
        max_num_seqs=MAX_NUM_SEQS,
        pages_per_seq=max(map(max, pages)) + 1,
        num_pages=max(map(sum, pages)) + 2,
        seed=seed,
    )


def reference(config, inputs):
    return ragged_paged_attention_reference(
        *inputs.args(),
        sm_scale=config.sm_scale,
        sliding_window=config.sliding_window,
        soft_cap=config.soft_cap,
    )


@pytest.mark.parametrize("kind", ["mixed", "decode", "prefill"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_matches_reference(name, kind):
    config = CONFIGS[name]
    inputs = batch_inputs(config, kind)
    out = ragged_paged_attention_tpu(
        *inputs.args(),
        sm_scale=config.sm_scale,
        sliding_window=config.sliding_window,
        soft_cap=config.soft_cap,
        num_queries_per_block=config.num_queries_per_block,
        num_pages_per_block=config.num_pages_per_block,
        interpret=True,
    )
    assert out.dtype == config.dtype and out.shape == inputs.q.shape
    expected = reference(config, inputs)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), **TOLERANCE[config.dtype]
    )
    # Padding rows (NaN in q) come back 0, as from the reference.
    num_real = int(inputs.cu_q_lens[int(inputs.num_seqs[0])])
    assert not np.asarray(out[num_real:]).any()


def test_tpu_backend_dispatches_to_kernel(monkeypatch):
    """The public entry point runs the kernel when the backend is a TPU: with the backend
    reported as "tpu" and interpret mode forced, the call goes through pallas (the
    reference has no pallas_call) with the tuned default block sizes and still matches."""
    config = Config(jnp.float32, 16, 4, 64)
    inputs = batch_inputs(config, "mixed", seed=1)
    monkeypatch.setattr(rpa_module.jax, "default_backend", lambda: "tpu")
    calls = []
    monkeypatch.setattr(
        rpa_module,
        "ragged_paged_attention_tpu",
        lambda *a, **kw: calls.append(kw) or ragged_paged_attention_tpu(*a, **kw),
    )
    with pltpu.force_tpu_interpret_mode():
        out = ragged_paged_attention(*inputs.args(), sm_scale=config.sm_scale)
    assert calls == [dict(sm_scale=config.sm_scale, sliding_window=None, soft_cap=None)]
    np.testing.assert_allclose(out, reference(config, inputs), **TOLERANCE[jnp.float32])


def test_cpu_backend_runs_reference():
    assert jax.default_backend() == "cpu"
    inputs = batch_inputs(Config(jnp.float32, 16, 1, 64), "decode")
    jaxpr = jax.make_jaxpr(lambda *a: ragged_paged_attention(*a, sm_scale=0.5))(*inputs.args())
    assert "pallas_call" not in str(jaxpr)


def test_tuned_block_sizes_fit_the_call():
    """Table lookups are clamped to the call: q blocks to the (16-aligned) token count,
    kv blocks to the page table; q rows stay a multiple of 16 for bf16 tiles."""
    big = block_sizes(head_dim=128, page_size=16, group=4, num_tokens=4096, pages_per_seq=512)
    assert (big.num_queries_per_block, big.num_pages_per_block) == (64, 16)  # 256 rows, 256 keys
    small = block_sizes(head_dim=128, page_size=64, group=8, num_tokens=3, pages_per_seq=2)
    assert (small.num_queries_per_block, small.num_pages_per_block) == (16, 2)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(num_queries_per_block=4), "num_queries_per_block"),  # 4 tokens x G=1: 4 rows
        (dict(num_queries_per_block=0), "num_queries_per_block"),
        (dict(num_pages_per_block=0), "num_pages_per_block"),
        (dict(num_pages_per_block=99), "num_pages_per_block"),
    ],
)
def test_bad_block_sizes_raise_value_error(overrides, match):
    config = Config(jnp.float32, 16, 1, 64)
    inputs = batch_inputs(config, "decode")
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention_tpu(*inputs.args(), sm_scale=0.5, interpret=True, **overrides)
