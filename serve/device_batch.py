"""The persistent batch: every running sequence's decode state, on device, in a fixed slot.

vLLM V1 keeps its input tensors on the GPU and updates them by diffs; so does this. A
sequence gets a slot when it is admitted and keeps it until it finishes. The slot holds
what a decode step needs without the host: the last sampled token and its position, the
block table, the sampling parameters, the penalty counts, the stop ids and the length cap.
The host sends only what changed: a few slot rows when sequences join or leave, the new
(slot, column, page) entries of the block tables, the tokens of a penalised prompt.
Nothing the host sends per step is proportional to `max_model_len` or to the vocabulary.

After sampling, `advance` writes each live row's token back into its slot and checks the
stops the device can check (stop ids, EOS unless ignored, the length cap); the host checks
the same conditions again, and stop strings, when the results come back.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tandem.model.attention_metadata import AttentionMetadata
from tandem.serve.sampler import NUM_STOP_IDS, SamplingBatch, bias_entries
from tandem.serve.sampling_params import SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceBatch:
    """S slots. Free slots are inactive; their rows are computed as padding and dropped."""

    tokens: jax.Array  # i32[S] the last sampled token: the next decode step's input
    positions: jax.Array  # i32[S] its position (where its K/V go)
    block_table: jax.Array  # i32[S, P]
    active: jax.Array  # bool[S] decoding and not stopped on device
    max_num_tokens: jax.Array  # i32[S] prompt + completion cap (max_tokens, max_model_len)
    # [S] rows; `step` counts generated tokens; `stop_ids` are the ones the device stops
    # on (EOS ids + stop_token_ids; the host checks them all); penalties and bias [S, V].
    sampling: SamplingBatch


def init_device_batch(num_slots: int, pages_per_seq: int, vocab_size: int) -> DeviceBatch:
    sampling = SamplingBatch.build([], [], [], vocab_size=vocab_size, pad_to=num_slots)
    sampling = dataclasses.replace(
        sampling,
        output_counts=np.zeros((num_slots, vocab_size), np.int32),
        prompt_mask=np.zeros((num_slots, vocab_size), np.bool_),
        bias=np.zeros((num_slots, vocab_size), np.float32),
    )
    batch = DeviceBatch(
        tokens=np.zeros(num_slots, np.int32),
        positions=np.zeros(num_slots, np.int32),
        block_table=np.zeros((num_slots, pages_per_seq), np.int32),
        active=np.zeros(num_slots, np.bool_),
        max_num_tokens=np.zeros(num_slots, np.int32),
        sampling=sampling,
    )
    return jax.tree.map(jnp.asarray, batch)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotRows:
    """New contents for A slots (host numpy); slot S pads and is dropped on device."""

    slots: np.ndarray  # i32[A]
    max_num_tokens: np.ndarray  # i32[A]
    bias_base: np.ndarray  # f32[A] every id's bias before set_bias entries (0 or -inf)
    sampling: SamplingBatch  # [A] rows, no penalty or bias columns; `step` = tokens generated


def slot_rows(
    slots: list[int],
    params: list[SamplingParams],
    *,
    sample_indices: list[int],
    num_generated: list[int],
    max_num_tokens: list[int],
    stop_ids: list[list[int]],
    num_slots: int,
    pad_to: int,
    vocab_size: int,
) -> SlotRows:
    """Rows for sequences taking `slots` (all inactive until their first token is sampled).
    A slot whose sequence left gets a row too: with no params it is just cleared."""
    num = len(slots)
    sampling = SamplingBatch.build(
        params, [[]] * num, [[]] * num, vocab_size=vocab_size, pad_to=pad_to,
        sample_indices=sample_indices,
    )  # fmt: skip
    stops = np.full((pad_to, NUM_STOP_IDS), -1, np.int32)
    for i, ids in enumerate(stop_ids):
        ids = list(dict.fromkeys(ids))[:NUM_STOP_IDS]  # the host checks any beyond
        stops[i, : len(ids)] = ids
    # The penalty and bias state lives on device (cleared here, filled by
    # add_penalty_tokens and set_bias): nothing of width V crosses per sequence.
    sampling = dataclasses.replace(
        sampling,
        num_top_logprobs=0,  # static fields fixed: one compilation of set_slots per bucket
        is_full=True,
        step=_pad(num_generated, pad_to, 0),
        stop_ids=stops,
        output_counts=np.zeros((pad_to, 0), np.int32),
        prompt_mask=np.zeros((pad_to, 0), np.bool_),
        bias=np.zeros((pad_to, 0), np.float32),
    )
    bias_base = np.zeros(pad_to, np.float32)
    bias_base[:num] = [bias_entries(p)[0] for p in params]
    return SlotRows(
        slots=_pad(slots, pad_to, num_slots),
        max_num_tokens=_pad(max_num_tokens, pad_to, 0),
        bias_base=bias_base,
        sampling=sampling,
    )


def set_slots(batch: DeviceBatch, rows: SlotRows) -> DeviceBatch:
    """Installs `rows` (inactive, penalty state cleared)."""
    s = rows.slots

    def put(old, new):
        return old.at[s].set(new.astype(old.dtype), mode="drop")

    sampling = batch.sampling
    new_sampling = rows.sampling
    fields = {
        f.name: put(getattr(sampling, f.name), getattr(new_sampling, f.name))
        for f in dataclasses.fields(SamplingBatch)
        if f.name not in ("output_counts", "prompt_mask", "bias", "num_top_logprobs", "is_full")
    }
    fields["output_counts"] = sampling.output_counts.at[s].set(0, mode="drop")
    fields["prompt_mask"] = sampling.prompt_mask.at[s].set(False, mode="drop")
    fields["bias"] = sampling.bias.at[s].set(rows.bias_base[:, None], mode="drop")
    return dataclasses.replace(
        batch,
        active=batch.active.at[s].set(False, mode="drop"),
        max_num_tokens=put(batch.max_num_tokens, rows.max_num_tokens),
        sampling=dataclasses.replace(sampling, **fields),
    )


def set_bias(batch: DeviceBatch, entries: jax.Array, values: jax.Array) -> DeviceBatch:
    """entries i32[N, 2] of (slot, token), values f32[N]: bias[slot, token] = value;
    slot S pads and is dropped."""
    sampling = batch.sampling
    bias = sampling.bias.at[entries[:, 0], entries[:, 1]].set(values, mode="drop")
    return dataclasses.replace(batch, sampling=dataclasses.replace(sampling, bias=bias))


def write_pages(batch: DeviceBatch, entries: jax.Array) -> DeviceBatch:
    """entries i32[N, 3] of (slot, column, page); slot S pads and is dropped."""
    slots, cols, pages = entries[:, 0], entries[:, 1], entries[:, 2]
    return dataclasses.replace(
        batch, block_table=batch.block_table.at[slots, cols].set(pages, mode="drop")
    )


def add_penalty_tokens(batch: DeviceBatch, entries: jax.Array) -> DeviceBatch:
    """entries i32[N, 3] of (slot, token, is_output): a prompt token marks the prompt mask,
    an output token (a recomputed sequence's history) adds to the counts; slot S pads."""
    slots, tokens, is_output = entries[:, 0], entries[:, 1], entries[:, 2] > 0
    sampling = batch.sampling
    num_slots = batch.active.shape[0]
    prompt_slots = jnp.where(is_output, num_slots, slots)
    output_slots = jnp.where(is_output, slots, num_slots)
    return dataclasses.replace(
        batch,
        sampling=dataclasses.replace(
            sampling,
            prompt_mask=sampling.prompt_mask.at[prompt_slots, tokens].set(True, mode="drop"),
            output_counts=sampling.output_counts.at[output_slots, tokens].add(1, mode="drop"),
        ),
    )


def rows_of(batch: DeviceBatch, slots: jax.Array, num_top: int, is_full: bool) -> SamplingBatch:
    """The sampling rows of `slots` (i32[R], each < S), with K top logprobs and the
    full sampler (sort, penalties) when some row needs it."""
    rows = jax.tree.map(lambda x: x[slots], batch.sampling)
    return dataclasses.replace(rows, num_top_logprobs=num_top, is_full=is_full)


def advance(
    batch: DeviceBatch,
    slots: jax.Array,  # i32[R]
    tokens: jax.Array,  # i32[R] sampled
    positions: jax.Array,  # i32[R] where each sampled token sits
    is_live: jax.Array,  # bool[R] rows whose token counts
) -> tuple[DeviceBatch, jax.Array]:  # the batch, bool[R] stopped
    """Writes each live row's sampled token into its slot and stops the slot on a stop id
    or at its length cap."""
    num_slots = batch.active.shape[0]
    safe = jnp.minimum(slots, num_slots - 1)
    stopped = jnp.any(tokens[:, None] == batch.sampling.stop_ids[safe], axis=-1) | (
        positions + 1 >= batch.max_num_tokens[safe]
    )
    target = jnp.where(is_live, slots, num_slots)  # dead rows write nothing
    sampling = batch.sampling
    sampling = dataclasses.replace(
        sampling,
        step=sampling.step.at[target].add(1, mode="drop"),
        output_counts=sampling.output_counts.at[target, tokens].add(1, mode="drop"),
    )
    batch = dataclasses.replace(
        batch,
        tokens=batch.tokens.at[target].set(tokens, mode="drop"),
        positions=batch.positions.at[target].set(positions, mode="drop"),
        active=batch.active.at[target].set(~stopped, mode="drop"),
        sampling=sampling,
    )
    return batch, stopped


def decode_metadata(batch: DeviceBatch, num_slots: int, page_size: int):
    """One decode token for each of the first `num_slots` slots: (tokens i32[B], metadata).
    Inactive slots compute a padding row that writes nothing and reads one key."""
    active = batch.active[:num_slots]
    positions = batch.positions[:num_slots]
    table = batch.block_table[:num_slots]
    page = jnp.take_along_axis(table, (positions // page_size)[:, None], axis=1)[:, 0]
    md = AttentionMetadata(
        positions=positions,
        slot_mapping=jnp.where(active, page * page_size + positions % page_size, -1),
        kv_lens=jnp.where(active, positions + 1, 1),
        page_indices=table,
        cu_q_lens=jnp.arange(num_slots + 1, dtype=jnp.int32),
        num_seqs=jnp.array([num_slots], jnp.int32),
    )
    return batch.tokens[:num_slots], md


def _pad(values, pad_to: int, fill: int) -> np.ndarray:
    out = np.full(pad_to, fill, np.int32)
    out[: len(values)] = values
    return out
