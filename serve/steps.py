"""The jitted steps the runner dispatches (serve/model_runner.py), as pure functions over
(weights, KV pages, device batch): a mixed step over prefill chunks and decodes, and up to
k decode steps in one call.

Each step is a forward (tokens -> logits) then a sampling half (logits -> tokens written
back into their slots). Fused in one call they are the usual path. Split in two calls, the
host computes a bitmask (a grammar's allowed tokens, serve/host_masks.py) while the device
runs the forward, and hands it to the sampling call: the mask costs the step only what it
takes beyond the forward (vLLM's overlap of the grammar bitmask with the forward pass). Both
paths sample with the same keys, so they produce the same tokens.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tandem.model.attention_metadata import AttentionMetadata
from tandem.serve import device_batch as db
from tandem.serve.sampler import sample


class StepResult(NamedTuple):
    """R sampled rows per step, k steps (1 for `mixed`). Token -1: the row produced
    nothing (a padding row, a stopped slot, or a step after every slot stopped)."""

    tokens: jax.Array  # i32[k, R]
    logprobs: jax.Array  # f32[k, R]
    top_ids: jax.Array  # i32[k, R, K]
    top_logprobs: jax.Array  # f32[k, R, K]


@dataclasses.dataclass(frozen=True)
class MixedInputs:
    """A mixed step's layout on the host: T padded tokens, S sequence rows (S = slots)."""

    token_ids: np.ndarray  # i32[T] prefill tokens (decode rows: read from their slot)
    token_slots: np.ndarray  # i32[T] slot of each token's sequence; S pads
    positions: np.ndarray  # i32[T]
    is_decode: np.ndarray  # i32[T] 1: the input is the slot's last sampled token
    cu_q_lens: np.ndarray  # i32[S + 1]
    kv_lens: np.ndarray  # i32[S]
    seq_slots: np.ndarray  # i32[S] the slot of each scheduled sequence (its block table)
    num_seqs: np.ndarray  # i32[1]
    sample_rows: np.ndarray  # i32[S] which token's logits each sampled row reads
    sample_slots: np.ndarray  # i32[S] the slot that takes the token; S pads
    sample_positions: np.ndarray  # i32[S] where the sampled token sits
    sample_is_decode: np.ndarray  # i32[S] 1: counts only while the slot is active

    def pack(self) -> np.ndarray:
        """One i32 vector: one transfer instead of twelve. Each field starts at a multiple
        of 256 bytes: XLA may hand a slice to a kernel as a view, and the Mosaic GPU
        kernel takes only aligned buffers."""
        parts = []
        for f in dataclasses.fields(self):
            x = getattr(self, f.name)
            parts += [x, np.zeros(_aligned(x.size) - x.size, np.int32)]
        return np.concatenate(parts)

    @classmethod
    def unpack(cls, flat: jax.Array, num_tokens: int, num_slots: int) -> MixedInputs:
        sizes = [num_tokens] * 4 + [num_slots + 1, num_slots, num_slots, 1] + [num_slots] * 4
        parts, start = [], 0
        for n in sizes:
            parts.append(flat[start : start + n])
            start += _aligned(n)
        return cls(*parts)


def _aligned(n: int) -> int:
    """n int32s rounded up to whole 256-byte blocks."""
    return -(-n // 64) * 64


def mixed_inputs(num_tokens: int, num_slots: int) -> dict[str, np.ndarray]:
    """Padding for every field of a T-token step (filled in place by the engine)."""
    s = num_slots
    return dict(
        token_ids=np.zeros(num_tokens, np.int32),
        token_slots=np.full(num_tokens, s, np.int32),
        positions=np.zeros(num_tokens, np.int32),
        is_decode=np.zeros(num_tokens, np.int32),
        cu_q_lens=np.zeros(s + 1, np.int32),
        kv_lens=np.zeros(s, np.int32),
        seq_slots=np.zeros(s, np.int32),
        num_seqs=np.zeros(1, np.int32),
        sample_rows=np.zeros(s, np.int32),
        sample_slots=np.full(s, s, np.int32),
        sample_positions=np.zeros(s, np.int32),
        sample_is_decode=np.zeros(s, np.int32),
    )


# Decode: one token for each of the first `num_slots` slots (B), k steps per call.


def _decode_forward(model, kv, batch, *, page_size, num_slots):
    tokens, md = db.decode_metadata(batch, num_slots, page_size)
    x, kv = model.paged_features(tokens, kv, md)
    return kv, model.logits(x)  # [B, V]


def _decode_sample(batch, logits, key, bitmask, *, num_slots, num_top, is_full):
    """Samples the slots' rows, writes the tokens back; the step's results, [B] each."""
    slots = jnp.arange(num_slots, dtype=jnp.int32)
    active = batch.active[:num_slots]
    mask = None if bitmask is None else bitmask[:num_slots]
    res = sample(logits, db.rows_of(batch, slots, num_top, is_full), key, mask)
    positions = batch.positions[:num_slots] + 1
    batch, _ = db.advance(batch, slots, res.tokens, positions, active)
    step = StepResult(jnp.where(active, res.tokens, -1), *res[1:])
    return batch, step


def _decode(params, kv, batch, key, *, graphdef, page_size, num_steps, num_slots, num_top,
            is_full):  # fmt: skip
    model = graphdef.merge(params)
    out = StepResult(
        jnp.full((num_steps, num_slots), -1, jnp.int32),
        jnp.zeros((num_steps, num_slots), jnp.float32),
        jnp.zeros((num_steps, num_slots, num_top), jnp.int32),
        jnp.zeros((num_steps, num_slots, num_top), jnp.float32),
    )

    def body(i, carry):
        kv, batch, out = carry
        kv, logits = _decode_forward(model, kv, batch, page_size=page_size, num_slots=num_slots)
        batch, step = _decode_sample(
            batch, logits, jax.random.fold_in(key, i), None,
            num_slots=num_slots, num_top=num_top, is_full=is_full,
        )  # fmt: skip
        out = StepResult(*(o.at[i].set(s) for o, s in zip(out, step)))
        return kv, batch, out

    # A counted loop: the trip count is static, so the GPU never waits on the host to
    # read a loop predicate between steps (a while_loop on a device value would).
    kv, batch, out = jax.lax.fori_loop(0, num_steps, body, (kv, batch, out))
    return kv, batch, out


def _decode_logits(params, kv, batch, *, graphdef, page_size, num_slots):
    model = graphdef.merge(params)
    return _decode_forward(model, kv, batch, page_size=page_size, num_slots=num_slots)


def _decode_masked(batch, logits, key, bitmask, *, num_slots, num_top, is_full):
    """The sampling half of a one-step decode call: the key the fused loop uses at step 0."""
    batch, step = _decode_sample(
        batch, logits, jax.random.fold_in(key, 0), bitmask,
        num_slots=num_slots, num_top=num_top, is_full=is_full,
    )  # fmt: skip
    return batch, StepResult(*(x[None] for x in step))


# Mixed: T tokens of prefill chunks and decodes; S sampled rows (one per slot at most).


def _mixed_forward(model, kv, batch, inp: MixedInputs, *, page_size, want_logits):
    num_slots = batch.active.shape[0]
    safe = jnp.minimum(inp.token_slots, num_slots - 1)
    is_decode = inp.is_decode > 0
    tokens = jnp.where(is_decode, batch.tokens[safe], inp.token_ids)
    # A decode row of a slot the device already stopped writes nothing.
    is_live = (inp.token_slots < num_slots) & (~is_decode | batch.active[safe])
    pos = inp.positions
    page = batch.block_table[safe, pos // page_size]
    md = AttentionMetadata(
        positions=pos,
        slot_mapping=jnp.where(is_live, page * page_size + pos % page_size, -1),
        kv_lens=inp.kv_lens,
        page_indices=batch.block_table[inp.seq_slots],
        cu_q_lens=inp.cu_q_lens,
        num_seqs=inp.num_seqs,
    )
    x, kv = model.paged_features(tokens, kv, md)  # [T, D]
    logits = model.logits(x[inp.sample_rows])  # [S, V]
    return kv, logits, (model.logits(x) if want_logits else None)


def _mixed_sample(batch, logits, key, inp: MixedInputs, bitmask, *, num_top, is_full):
    num_slots = batch.active.shape[0]
    row_slots = jnp.minimum(inp.sample_slots, num_slots - 1)
    mask = None if bitmask is None else bitmask[row_slots]
    res = sample(logits, db.rows_of(batch, row_slots, num_top, is_full), key, mask)
    row_live = (inp.sample_slots < num_slots) & (
        (inp.sample_is_decode == 0) | batch.active[row_slots]
    )
    batch, _ = db.advance(batch, inp.sample_slots, res.tokens, inp.sample_positions, row_live)
    step = StepResult(jnp.where(row_live, res.tokens, -1), *res[1:])
    return batch, StepResult(*(x[None] for x in step))


def _mixed(params, kv, batch, key, packed, *, graphdef, page_size, num_tokens, num_top,
           is_full, want_logits):  # fmt: skip
    inp = MixedInputs.unpack(packed, num_tokens, batch.active.shape[0])
    kv, logits, all_logits = _mixed_forward(
        graphdef.merge(params), kv, batch, inp, page_size=page_size, want_logits=want_logits
    )
    batch, out = _mixed_sample(batch, logits, key, inp, None, num_top=num_top, is_full=is_full)
    return kv, batch, out, all_logits


def _mixed_logits(params, kv, batch, packed, *, graphdef, page_size, num_tokens, want_logits):
    inp = MixedInputs.unpack(packed, num_tokens, batch.active.shape[0])
    return _mixed_forward(
        graphdef.merge(params), kv, batch, inp, page_size=page_size, want_logits=want_logits
    )


def _mixed_masked(batch, logits, key, packed, bitmask, *, num_tokens, num_top, is_full):
    inp = MixedInputs.unpack(packed, num_tokens, batch.active.shape[0])
    return _mixed_sample(batch, logits, key, inp, bitmask, num_top=num_top, is_full=is_full)


# Module-level, keyed on the model's graph: engines of the same architecture and shapes
# (a server and a bench, RL runs, tests) share their compilations. KV pages and the batch
# are donated: the largest buffers, never read again after the call that rewrites them.
_MODEL = ("graphdef", "page_size")
decode_jit = jax.jit(
    _decode,
    static_argnames=(*_MODEL, "num_steps", "num_slots", "num_top", "is_full"),
    donate_argnums=(1, 2),
)
decode_logits_jit = jax.jit(
    _decode_logits, static_argnames=(*_MODEL, "num_slots"), donate_argnums=(1,)
)
decode_masked_jit = jax.jit(
    _decode_masked, static_argnames=("num_slots", "num_top", "is_full"), donate_argnums=(0,)
)
mixed_jit = jax.jit(
    _mixed,
    static_argnames=(*_MODEL, "num_tokens", "num_top", "is_full", "want_logits"),
    donate_argnums=(1, 2),
)
mixed_logits_jit = jax.jit(
    _mixed_logits, static_argnames=(*_MODEL, "num_tokens", "want_logits"), donate_argnums=(1,)
)
mixed_masked_jit = jax.jit(
    _mixed_masked, static_argnames=("num_tokens", "num_top", "is_full"), donate_argnums=(0,)
)
STEP_JITS = (
    decode_jit, decode_logits_jit, decode_masked_jit, mixed_jit, mixed_logits_jit, mixed_masked_jit
)  # fmt: skip
