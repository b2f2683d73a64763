"""Logits -> tokens for a padded batch: penalties, temperature, top-k/top-p/min-p, seeded keys.

`SamplingBatch` holds the rows' SamplingParams as arrays. The engine keeps one per slot on
device (serve/device_batch.py) and gathers the rows it samples; `SamplingBatch.build` packs
them on the host (tests, one-off calls). `sample` is one jitted pure function over them,
compiled once per padded batch size B (and per penalty width, 0 or V, and logprob width K).

Order, as in vLLM V1:
  1. logprobs over the full vocabulary, before any processing or truncation: per row,
     log_softmax(logits / logprob_temperature), where logprob_temperature is 1 for
     `logprobs_mode="raw"` (the model's own distribution; vLLM's default "raw_logprobs")
     and the row's temperature for "scaled" (the policy the token is drawn from, which RL
     importance ratios need). A per-row array, so mixing modes never recompiles.
  2. the row's token restrictions: its stop ids are banned until it has `min_tokens`
     tokens; the bias row adds `logit_bias` and -inf outside `allowed_token_ids` and at
     one-token `bad_words`; a grammar's (or multi-token bad words') bitmask, computed on
     the host for this step, leaves -inf at the ids it disallows.
  3. penalties on the raw logits: repetition (HF: over prompt and output tokens, a positive
     logit is divided by it, a negative one multiplied), then frequency and presence
     (OpenAI: over output tokens only, `logit -= frequency * count + presence * (count > 0)`).
  4. greedy rows (temperature < GREEDY_EPS) take the argmax of the penalised logits.
  5. sampled rows divide by temperature, keep the top_k tokens, then the smallest set whose
     mass is >= top_p (always the top token), then drop tokens with
     prob < min_p * max prob, and draw with the row's key.

Keys: a seeded row's key is fold_in(fold_in(fold_in(key(seed_lo), seed_hi), sample_index),
step), with step = the index of the token being generated (its output length), so a seed
gives the same tokens whatever the batch and the row position. Unseeded rows use
fold_in(key, row) of the `key` the caller passes and advances every step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tandem.serve.sampling_params import GREEDY_EPS, MAX_LOGPROBS, SamplingParams

# Ids a row bans until it has min_tokens tokens: its stop ids (EOS and stop_token_ids), as
# the device also checks them; the host checks any beyond.
NUM_STOP_IDS = 8


@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """One step's sampling metadata over B padded rows (numpy on the host, a pytree on
    device). Padding rows are greedy with no penalties; their outputs are ignored."""

    temperature: np.ndarray  # f32[B], 0 for greedy rows
    top_k: np.ndarray  # i32[B], 0 = off
    top_p: np.ndarray  # f32[B]
    min_p: np.ndarray  # f32[B]
    repetition_penalty: np.ndarray  # f32[B]
    presence_penalty: np.ndarray  # f32[B]
    frequency_penalty: np.ndarray  # f32[B]
    # Penalty state, dense over the vocabulary (vLLM V1's layout): how often each token
    # occurs in the row's output, and whether it occurs in its prompt. Width 0 when no row
    # is penalised (the penalty step is skipped at trace time); on device the engine keeps
    # width V and updates the counts as tokens are sampled, never re-sending histories.
    output_counts: np.ndarray  # i32[B, V or 0]
    prompt_mask: np.ndarray  # bool[B, V or 0]
    is_seeded: np.ndarray  # bool[B]
    seed: np.ndarray  # u32[B, 2], (low, high) 32 bits of the seed mod 2**64
    sample_index: np.ndarray  # i32[B], which of the request's n completions
    step: np.ndarray  # i32[B], index of the token being generated
    logprob_temperature: np.ndarray  # f32[B], divides logits for logprobs: 1 = raw
    # min_tokens: these ids are banned while step < min_tokens.
    min_tokens: np.ndarray  # i32[B]
    stop_ids: np.ndarray  # i32[B, NUM_STOP_IDS], -1 padded
    # logit_bias, allowed_token_ids, one-token bad_words, added to the logits (-inf bans).
    # Width 0 when no row has any (skipped at trace time), V on device, as the penalties.
    bias: np.ndarray  # f32[B, V or 0]
    num_top_logprobs: int = dataclasses.field(default=0, metadata=dict(static=True))
    """K, static: MAX_LOGPROBS (at most V) when any row asks for alternatives, else 0."""
    is_full: bool = dataclasses.field(default=True, metadata=dict(static=True))
    """Static: some row uses top-k, top-p or penalties (`needs_full_sampler`). False
    skips the sort and the penalties at trace time (temperature, min-p and greedy rows
    are sampled exactly the same either way)."""

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def build(
        cls,
        params_list: Sequence[SamplingParams],
        prompt_token_ids_list: Sequence[Sequence[int]],
        output_token_ids_list: Sequence[Sequence[int]],
        *,
        vocab_size: int,
        pad_to: int,
        sample_indices: Sequence[int] | None = None,
        eos_ids: Sequence[int] = (),
    ) -> SamplingBatch:
        """Rows in order, padded to `pad_to`. `output_token_ids_list[i]` is what row i has
        generated so far (its length is the step); `sample_indices[i]` is the row's index
        among its request's n completions (default 0), so that n seeded completions
        differ. `eos_ids` join each row's stop ids (unless it ignores EOS) for min_tokens."""
        num_rows = len(params_list)
        if num_rows > pad_to:
            raise ValueError(f"{num_rows} rows do not fit pad_to={pad_to}")
        if not (len(prompt_token_ids_list) == len(output_token_ids_list) == num_rows):
            raise ValueError("params, prompt and output lists must have equal lengths")
        sample_indices = [0] * num_rows if sample_indices is None else list(sample_indices)
        if len(sample_indices) != num_rows:
            raise ValueError("sample_indices must have one entry per row")

        def column(fn, dtype, pad):
            out = np.full(pad_to, pad, dtype)
            out[:num_rows] = [fn(p) for p in params_list]
            return out

        temperature = column(lambda p: 0.0 if p.is_greedy else p.temperature, np.float32, 0.0)
        top_k = column(lambda p: min(max(p.top_k, 0), vocab_size), np.int32, 0)
        seed = np.zeros((pad_to, 2), np.uint32)
        for i, p in enumerate(params_list):
            if p.seed is not None:
                s = p.seed % 2**64
                seed[i] = (s & 0xFFFFFFFF, s >> 32)

        penalised = [i for i, p in enumerate(params_list) if p.uses_penalties]
        width = vocab_size if penalised else 0
        output_counts = np.zeros((pad_to, width), np.int32)
        prompt_mask = np.zeros((pad_to, width), np.bool_)
        for i in penalised:
            prompt = np.asarray(prompt_token_ids_list[i], np.int64)
            output = np.asarray(output_token_ids_list[i], np.int64)
            ids = np.concatenate([prompt, output])
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"row {i}: token ids must lie in [0, {vocab_size})")
            np.add.at(output_counts[i], output, 1)
            prompt_mask[i, prompt] = True

        stop_ids = np.full((pad_to, NUM_STOP_IDS), -1, np.int32)
        for i, p in enumerate(params_list):
            ids = stop_ids_of(p, eos_ids)[:NUM_STOP_IDS]
            stop_ids[i, : len(ids)] = ids
        biased = [i for i, p in enumerate(params_list) if has_bias(p)]
        bias = np.zeros((pad_to, vocab_size if biased else 0), np.float32)
        for i in biased:
            bias[i] = bias_row(params_list[i], vocab_size)

        wants_top = any(p.logprobs for p in params_list)
        is_full = any(needs_full_sampler(p) for p in params_list)
        return cls(
            temperature=temperature,
            top_k=top_k,
            top_p=column(lambda p: p.top_p, np.float32, 1.0),
            min_p=column(lambda p: p.min_p, np.float32, 0.0),
            repetition_penalty=column(lambda p: p.repetition_penalty, np.float32, 1.0),
            presence_penalty=column(lambda p: p.presence_penalty, np.float32, 0.0),
            frequency_penalty=column(lambda p: p.frequency_penalty, np.float32, 0.0),
            output_counts=output_counts,
            prompt_mask=prompt_mask,
            is_seeded=column(lambda p: p.seed is not None, np.bool_, False),
            seed=seed,
            sample_index=_pad(sample_indices, pad_to, np.int32),
            step=_pad([len(o) for o in output_token_ids_list], pad_to, np.int32),
            logprob_temperature=column(lambda p: p.logprob_temperature, np.float32, 1.0),
            min_tokens=column(lambda p: p.min_tokens, np.int32, 0),
            stop_ids=stop_ids,
            bias=bias,
            num_top_logprobs=min(MAX_LOGPROBS, vocab_size) if wants_top else 0,
            is_full=is_full,
        )


jax.tree_util.register_dataclass(SamplingBatch)


def needs_full_sampler(params: SamplingParams) -> bool:
    """Whether a row needs the sort (top-k, top-p), the penalty pass or its bias row."""
    return (
        (not params.is_greedy and (params.top_k > 0 or params.top_p < 1.0))
        or params.uses_penalties
        or has_bias(params)
    )


def has_bias(params: SamplingParams) -> bool:
    """Whether a row has a bias row: logit_bias, allowed_token_ids or one-token bad_words."""
    return bool(
        params.logit_bias
        or params.allowed_token_ids is not None
        or any(len(w) == 1 for w in params.bad_words)
    )


def bias_entries(params: SamplingParams) -> tuple[float, list[tuple[int, float]]]:
    """The row's bias as (base, [(token, value)]): every id starts at `base` (0, or -inf
    outside allowed_token_ids), then each entry is set. Later entries win: a one-token bad
    word bans a token even if it is allowed or biased."""
    base = 0.0 if params.allowed_token_ids is None else -np.inf
    entries = dict.fromkeys(params.allowed_token_ids or (), 0.0)
    for token, value in params.logit_bias:
        if params.allowed_token_ids is None or token in entries:
            entries[token] = float(value)
    for word in params.bad_words:
        if len(word) == 1:
            entries[word[0]] = -np.inf
    return base, list(entries.items())


def bias_row(params: SamplingParams, vocab_size: int) -> np.ndarray:
    """f32[V], the row's bias (`bias_entries` laid out densely)."""
    base, entries = bias_entries(params)
    row = np.full(vocab_size, base, np.float32)
    for token, value in entries:
        row[token] = value
    return row


def stop_ids_of(params: SamplingParams, eos_ids: Sequence[int]) -> list[int]:
    """The ids that end a row: its stop_token_ids and, unless it ignores EOS, `eos_ids`."""
    ids = list(params.stop_token_ids) + ([] if params.ignore_eos else sorted(eos_ids))
    return list(dict.fromkeys(ids))


class SampleResult(NamedTuple):
    tokens: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B], log_softmax (raw or scaled, per row) at the sampled token
    top_ids: jax.Array  # i32[B, K], most likely first
    top_logprobs: jax.Array  # f32[B, K]


@jax.jit
def sample(
    logits: jax.Array, batch: SamplingBatch, key: jax.Array, bitmask: jax.Array | None = None
) -> SampleResult:
    """logits f32[B, V] -> SampleResult. `key` (a jax.random.key) feeds the unseeded rows;
    pass a fresh one each step. `bitmask` i32[B, ceil(V / 32)] (bit j of word w allows token
    32 w + j), or None when no row has one. See the module docstring for the order."""
    logits = logits.astype(jnp.float32)
    num_rows, vocab = logits.shape  # B, V
    # Raw rows divide by exactly 1.0, so their logprobs are bit-identical to raw mode's.
    logprobs, top_ids, top_logprobs = _full_logprobs(
        logits / batch.logprob_temperature[:, None], batch.num_top_logprobs
    )

    logits = restrict(logits, batch, bitmask)
    if batch.is_full and batch.output_counts.shape[1]:
        logits = apply_penalties(logits, batch)  # exact identity on unpenalised rows
    is_greedy = batch.temperature < GREEDY_EPS
    greedy_tokens = jnp.argmax(logits, axis=-1)

    scaled = logits / jnp.where(is_greedy, 1.0, batch.temperature)[:, None]
    if batch.is_full:
        # The sort is the costly part of sampling. Chosen at trace time, by the caller
        # that knows the rows: a run-time branch would make the GPU wait for the host
        # to read its predicate in the middle of every step.
        top_k = jnp.where(batch.top_k > 0, jnp.minimum(batch.top_k, vocab), vocab)
        scaled = _top_k_top_p(scaled, top_k, batch.top_p)
    # min-p: prob < min_p * max prob  <=>  logit < max logit + log(min_p). The ratio of
    # probabilities survives truncation, so it does not matter that top-k/top-p ran first.
    floor = jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(batch.min_p)[:, None]
    scaled = jnp.where(scaled < floor, -jnp.inf, scaled)

    keys = jax.vmap(_row_key, in_axes=(None, 0, 0, 0, 0, 0))(
        key, jnp.arange(num_rows), batch.is_seeded, batch.seed, batch.sample_index, batch.step
    )
    sampled_tokens = jax.vmap(jax.random.categorical)(keys, scaled)
    tokens = jnp.where(is_greedy, greedy_tokens, sampled_tokens).astype(jnp.int32)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return SampleResult(tokens, chosen, top_ids, top_logprobs)


@functools.partial(jax.jit, static_argnames="num_top")
def token_logprobs(
    logits: jax.Array, token_ids: jax.Array, num_top: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Raw logprobs of given tokens, e.g. prompt_logprobs: logits f32[T, V], token_ids
    i32[T] -> (f32[T], top ids i32[T, num_top], top logprobs f32[T, num_top])."""
    logprobs, top_ids, top_logprobs = _full_logprobs(logits.astype(jnp.float32), num_top)
    chosen = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)[:, 0]
    return chosen, top_ids, top_logprobs


def restrict(logits: jax.Array, batch: SamplingBatch, bitmask: jax.Array | None) -> jax.Array:
    """min_tokens, the bias row and the bitmask (module docstring, step 2)."""
    num_rows = logits.shape[0]
    early = (batch.step < batch.min_tokens)[:, None] & (batch.stop_ids >= 0)  # [B, M]
    rows = jnp.broadcast_to(jnp.arange(num_rows)[:, None], early.shape)
    banned = jnp.where(early, batch.stop_ids, logits.shape[1])  # V: out of range, dropped
    logits = logits.at[rows, banned].set(-jnp.inf, mode="drop")
    if batch.is_full and batch.bias.shape[1]:
        logits = logits + batch.bias
    if bitmask is not None:
        logits = jnp.where(unpack_bitmask(bitmask, logits.shape[1]), logits, -jnp.inf)
    return logits


def unpack_bitmask(bitmask: jax.Array, vocab: int) -> jax.Array:
    """i32[B, W] -> bool[B, V]: bit j of word w allows token 32 w + j."""
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab] > 0


def apply_penalties(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """Repetition (over prompt and output tokens), then frequency and presence (output)."""
    counts = batch.output_counts  # [B, V]
    seen = batch.prompt_mask | (counts > 0)
    rep = batch.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - batch.frequency_penalty[:, None] * counts
    return logits - batch.presence_penalty[:, None] * (counts > 0)


def _top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Masks to -inf what top-k (i32[B], V = off), then top-p (f32[B]) drop. Tokens tied
    with the last kept one are kept too."""
    vocab = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
    rank = jnp.arange(vocab)
    in_top_k = rank[None, :] < top_k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # top_p == 1 keeps everything: a float cumsum may reach 1 before the tail.
    keep = in_top_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    num_keep = jnp.sum(keep, axis=-1)  # >= 1: the top token has no mass before it
    threshold = jnp.take_along_axis(desc, num_keep[:, None] - 1, axis=-1)  # [B, 1]
    return jnp.where(scaled < threshold, -jnp.inf, scaled)


def _row_key(key, row, is_seeded, seed, sample_index, step):
    seeded = jax.random.fold_in(jax.random.key(seed[0]), seed[1])
    seeded = jax.random.fold_in(jax.random.fold_in(seeded, sample_index), step)
    unseeded = jax.random.fold_in(key, row)
    data = jnp.where(is_seeded, jax.random.key_data(seeded), jax.random.key_data(unseeded))
    return jax.random.wrap_key_data(data)


def _full_logprobs(logits: jax.Array, num_top: int):
    """logits f32[B, V] -> (log_softmax f32[B, V], top ids i32[B, K], top logprobs f32[B, K])
    over the full vocabulary, before any truncation."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    if num_top:
        top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)
    else:
        top_logprobs = jnp.zeros((logits.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return logprobs, top_ids.astype(jnp.int32), top_logprobs


def _pad(values, pad_to, dtype):
    out = np.zeros(pad_to, dtype)
    out[: len(values)] = values
    return out
