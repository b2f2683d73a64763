"""The one model runner: KV pages, the persistent device batch and the jitted calls.

Every way of generating (`tandem serve`, `LLM.generate`, `tandem generate`, RL rollouts)
goes through `Engine`, and the engine through this. The runner knows no sequences, only
slots: the host says which slots take part and what changed, and the runner dispatches:

- `mixed`: one step over prefill chunks (tokens from the host) and decodes (tokens from
  their slots), sampling the rows that complete;
- `decode`: up to `num_steps` decode steps of every active slot in one call (a counted
  loop on device that samples, writes the tokens back and checks the stops).

Both return a `StepResult` of device arrays whose copy to the host has started; the
engine reads it a call later (`jax.device_get`), so the host plans the next call while
the device runs this one. Given a bitmask function (a grammar's allowed tokens), a step
is dispatched in two halves and the function runs while the device computes the forward
(serve/steps.py, where the jitted functions are).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tandem.model.kv_cache import KV_AXES, copy_blocks, init_kv_cache
from tandem.model.sharding import mesh_context, named_sharding
from tandem.model.transformer import Transformer
from tandem.serve import device_batch as db
from tandem.serve.buckets import power_of_two_at_least, power_of_two_buckets
from tandem.serve.sampling_params import MAX_LOGPROBS
from tandem.serve.steps import (
    STEP_JITS,
    MixedInputs,
    StepResult,
    decode_jit,
    decode_logits_jit,
    decode_masked_jit,
    mixed_inputs,
    mixed_jit,
    mixed_logits_jit,
    mixed_masked_jit,
)

# Entries of a block-table or penalty diff are padded to powers of two from here.
MIN_ENTRIES = 64


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        *,
        num_pages: int,
        page_size: int,
        max_num_seqs: int,
        pages_per_seq: int,
        max_num_batched_tokens: int,
        max_decode_steps: int,
        kv_dtype,
        mesh=None,
        seed: int = 0,
    ):
        cfg = model.config
        self.page_size = page_size
        self.num_slots = max_num_seqs
        self.max_decode_steps = max_decode_steps
        self.num_top = min(MAX_LOGPROBS, cfg.vocab_size)
        self.mesh = mesh
        self.token_buckets = power_of_two_buckets(max_num_batched_tokens, 16)
        self.slot_buckets = power_of_two_buckets(max_num_seqs, 8)
        # One call of k steps, or of 1 when no sequence has more to go (a slot stops on
        # device at its own cap, so rounding up to k only idles rows).
        self.step_buckets = sorted({1, max_decode_steps})
        graphdef, self.params = nnx.split(model)
        # The calls take the weights as flat leaves (flattening an nnx.State costs 0.7 ms of
        # Python per call here; a list, microseconds), rebuilt inside from the treedef.
        self._leaves, treedef = jax.tree.flatten(self.params)
        self.graphdef = _interned(graphdef, treedef)
        if mesh is not None:
            # Replicated, spelled as jit hands it back, so each call reuses its compilation.
            place = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        else:
            # Committed to the weights' device, as the outputs of a call come back: an
            # uncommitted first input would compile the same step a second time.
            place = jax.sharding.SingleDeviceSharding(
                next(iter(jax.tree.leaves(self.params)[0].devices()))
            )
        kv_sharding = place if mesh is None else _kv_sharding(mesh, cfg, num_pages, page_size)
        self.kv = init_kv_cache(cfg, num_pages, page_size, kv_dtype, kv_sharding)
        batch = db.init_device_batch(max_num_seqs, pages_per_seq, cfg.vocab_size)
        self.batch = jax.device_put(batch, place)
        self._key = jax.random.key(seed)
        self._set_slots = jax.jit(db.set_slots, donate_argnums=(0,))
        self._write_pages = jax.jit(db.write_pages, donate_argnums=(0,))
        self._add_penalty_tokens = jax.jit(db.add_penalty_tokens, donate_argnums=(0,))
        self._set_bias = jax.jit(db.set_bias, donate_argnums=(0,))
        self._copy_blocks = jax.jit(copy_blocks, donate_argnums=(0,))

    def set_params(self, params: nnx.State) -> None:
        """Serves `params` from the next call on, by reference (`Engine.update_params`).
        On a mesh they take the runner's own shardings: a train step hands back equivalent
        ones spelled its own way, which jit would key as new input types and compile again;
        `device_put` onto an equivalent sharding moves no data."""
        check_same_tree(self.params, params)
        if self.mesh is not None:
            params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, self.params))
        self.params = params
        self._leaves = jax.tree.leaves(params)

    # Diffs to the persistent state (applied in call order on device).

    def set_slots(self, rows: db.SlotRows) -> None:
        with mesh_context(self.mesh):
            self.batch = self._set_slots(self.batch, rows)

    def write_pages(self, entries: list[tuple[int, int, int]]) -> None:
        """(slot, column, page) block-table entries."""
        with mesh_context(self.mesh):
            self.batch = self._write_pages(self.batch, self._entries(entries))

    def add_penalty_tokens(self, entries: list[tuple[int, int, int]]) -> None:
        """(slot, token, is_output) entries of penalised sequences joining."""
        with mesh_context(self.mesh):
            self.batch = self._add_penalty_tokens(self.batch, self._entries(entries))

    def set_bias(self, entries: list[tuple[int, int, float]]) -> None:
        """(slot, token, value) bias entries of sequences joining (after `set_slots`)."""
        n = power_of_two_at_least(len(entries), MIN_ENTRIES)
        ids = np.full((n, 2), [self.num_slots, 0], np.int32)
        values = np.zeros(n, np.float32)
        if entries:
            ids[: len(entries)] = [e[:2] for e in entries]
            values[: len(entries)] = [e[2] for e in entries]
        with mesh_context(self.mesh):
            self.batch = self._set_bias(self.batch, ids, values)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        with mesh_context(self.mesh):
            self.kv = self._copy_blocks(self.kv, jnp.asarray(np.array(copies, np.int32)))

    # Steps.

    def decode(
        self,
        num_steps: int,
        num_slots: int,
        num_top: int,
        is_full: bool = True,
        bitmask: Callable[[], np.ndarray] | None = None,
    ) -> StepResult:
        """`num_steps` (a step bucket) decode steps of the first `num_slots` slots (a slot
        bucket). A slot stops on device at its stop ids and length cap and produces
        nothing after; the caller plans no slot past its cap. `bitmask() -> i32[S, W]`:
        the tokens each slot may sample, called while the forward runs (one step only: a
        mask holds for the step it was computed for)."""
        if bitmask is not None and num_steps != 1:
            raise ValueError(f"a bitmask holds for one step, not {num_steps}")
        model = dict(graphdef=self.graphdef, page_size=self.page_size, num_slots=num_slots)
        sampling = dict(num_slots=num_slots, num_top=num_top, is_full=is_full)
        with mesh_context(self.mesh):
            if bitmask is None:
                self.kv, self.batch, result = decode_jit(
                    self._leaves, self.kv, self.batch, self._next_key(),
                    num_steps=num_steps, **model, num_top=num_top, is_full=is_full,
                )  # fmt: skip
            else:
                self.kv, logits = decode_logits_jit(self._leaves, self.kv, self.batch, **model)
                self.batch, result = decode_masked_jit(
                    self.batch, logits, self._next_key(), bitmask(), **sampling
                )
        return _start_copy(result)

    def mixed(
        self,
        inputs: MixedInputs,
        num_top: int,
        want_logits: bool,
        is_full: bool = True,
        bitmask: Callable[[], np.ndarray] | None = None,
    ) -> tuple[StepResult, jax.Array | None]:
        """One step; with `want_logits` also f32[T, V], the logits of every token.
        `bitmask() -> i32[S, W]`: the tokens each slot may sample, called while the
        forward runs."""
        num_tokens = inputs.token_ids.shape[0]
        model = dict(graphdef=self.graphdef, page_size=self.page_size, num_tokens=num_tokens)
        sampling = dict(num_tokens=num_tokens, num_top=num_top, is_full=is_full)
        with mesh_context(self.mesh):
            if bitmask is None:
                self.kv, self.batch, result, logits = mixed_jit(
                    self._leaves, self.kv, self.batch, self._next_key(), inputs.pack(),
                    **model, num_top=num_top, is_full=is_full, want_logits=want_logits,
                )  # fmt: skip
            else:
                packed = jnp.asarray(inputs.pack())
                self.kv, rows, logits = mixed_logits_jit(
                    self._leaves, self.kv, self.batch, packed, **model, want_logits=want_logits
                )
                self.batch, result = mixed_masked_jit(
                    self.batch, rows, self._next_key(), packed, bitmask(), **sampling
                )
        return _start_copy(result), logits

    def warm_up(self, *, full: bool = True, logprobs: bool = False) -> float:
        """Compiles every bucket of both steps (and the diffs) on padding, which changes no
        state; returns the seconds it took. `full`: also the sampler with top-k/top-p and
        penalties; `logprobs`: also the steps that return top logprobs and prompt logits
        (otherwise compiled when first asked for)."""
        start = time.perf_counter()
        tops = (0, self.num_top) if logprobs else (0,)
        modes = (False, True) if full else (False,)
        for num_tokens in self.token_buckets:
            inputs = MixedInputs(**mixed_inputs(num_tokens, self.num_slots))
            for num_top, is_full, want in itertools.product(tops, modes, (False, logprobs)):
                self.mixed(inputs, num_top, want, is_full)
        for num_slots, num_steps in itertools.product(self.slot_buckets, self.step_buckets):
            for num_top, is_full in itertools.product(tops, modes):
                self.decode(num_steps, num_slots, num_top, is_full)
        self.write_pages([])
        self.copy_blocks([(0, 0)])
        jax.block_until_ready((self.kv, self.batch))
        return time.perf_counter() - start

    def _next_key(self) -> jax.Array:
        self._key, key = jax.random.split(self._key)
        return key

    @property
    def num_compiles(self) -> int:
        """Step compilations in this process (shared by runners of one architecture)."""
        return sum(f._cache_size() for f in STEP_JITS)

    def _entries(self, entries) -> np.ndarray:
        n = power_of_two_at_least(len(entries), MIN_ENTRIES)
        out = np.full((n, 3), [self.num_slots, 0, 0], np.int32)
        if entries:
            out[: len(entries)] = entries
        return out


def check_same_tree(old, new) -> None:
    """Raises ValueError naming the first leaf path where `new` differs from `old` (a leaf
    missing or extra, another shape or dtype) or, failing that, if the structures differ."""
    flat = jax.tree_util.tree_flatten_with_path
    old_leaves = {jax.tree_util.keystr(p): x for p, x in flat(old)[0]}
    new_leaves = {jax.tree_util.keystr(p): x for p, x in flat(new)[0]}
    for path in list(old_leaves) + [p for p in new_leaves if p not in old_leaves]:
        if path not in new_leaves:
            raise ValueError(f"update_params: {path} is missing from the new params")
        if path not in old_leaves:
            raise ValueError(f"update_params: {path} is not a parameter of the served model")
        a, b = old_leaves[path], new_leaves[path]
        if np.shape(a) != np.shape(b) or jnp.result_type(a) != jnp.result_type(b):
            raise ValueError(
                f"update_params: {path} is {jnp.result_type(b)}{list(np.shape(b))}, "
                f"the served model's is {jnp.result_type(a)}{list(np.shape(a))}"
            )
    if jax.tree.structure(old) != jax.tree.structure(new):
        raise ValueError("update_params: the new params' tree structure differs")


def _kv_sharding(mesh, cfg, num_pages: int, page_size: int):
    """The KV pages sharded on kv heads, spelled as jit hands sharded outputs back (no
    trailing Nones): the pages a step returns must match the ones it was compiled for, or
    the next step of the same shapes compiles again."""
    shape = (num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
    spec = list(named_sharding(mesh, KV_AXES, shape).spec)
    while spec and spec[-1] is None:
        spec.pop()
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


class _Graph:
    """A model graph (and its params' treedef) as a static jit argument: hashed by
    identity (a GraphDef hashes its whole structure, a millisecond per call), one object
    per distinct graph."""

    def __init__(self, graphdef, treedef):
        self.graphdef = graphdef
        self.treedef = treedef

    def merge(self, leaves) -> Transformer:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


_GRAPHS: dict = {}


def _interned(graphdef, treedef) -> _Graph:
    return _GRAPHS.setdefault((graphdef, treedef), _Graph(graphdef, treedef))


def _start_copy(result: StepResult) -> StepResult:
    for x in result:
        x.copy_to_host_async()
    return result
