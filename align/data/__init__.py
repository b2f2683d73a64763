"""Training data for tandem's trainers: records -> examples -> grain batches.

    records = read_records("train.jsonl", layout="sft")       # or synthetic_arithmetic(...)
    example_fn = functools.partial(tokenize_sft, tokenizer=tok, max_length=512)
    ds = make_dataset(records, example_fn, batch_size=8, seed=0)
    it = iter(ds)
    batch = next(it)                 # {"tokens": i32[B, T], "loss_mask": f32[B, T]}
    state = it.get_state()           # JSON-serialisable; the checkpointer stores it
    it2 = iter(ds); it2.set_state(state)   # continues with exactly the same batches

Layouts live in records.py, tokenisation in tokenize.py, packing in pack.py and the
synthetic sets in synthetic.py; this module builds the pipeline and re-exports the public
functions. preference.py holds what DPO and reward models share: the iterator of tokenised
pairs and their [2B, T] row layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from tandem.align.data.pack import pack_examples
from tandem.align.data.records import check_layout, read_records
from tandem.align.data.synthetic import synthetic_arithmetic, synthetic_preferences
from tandem.align.data.tokenize import tokenize_preference, tokenize_prompt, tokenize_sft

__all__ = [
    "check_layout",
    "make_dataset",
    "pack_examples",
    "read_records",
    "synthetic_arithmetic",
    "synthetic_preferences",
    "tokenize_preference",
    "tokenize_prompt",
    "tokenize_sft",
]

# Examples gathered per packing window, per batch row: first fit over a larger window
# fills rows better; the window is also what a restored iterator re-packs, so keep it small.
PACK_WINDOW_PER_ROW = 4
# Tokenisation runs in grain's reader threads; a few are enough to keep a trainer fed and
# the buffer bounds the host memory held by examples read ahead.
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)


def make_dataset(
    records: Sequence[dict],
    example_fn: Callable[[dict], dict],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    pack_length: int | None = None,
) -> grain.IterDataset:
    """A grain pipeline: shuffle per epoch -> example_fn -> (pack) -> batch.

    Every epoch is a fresh permutation of `records` drawn from `seed` (grain reseeds the
    shuffle per repetition). `num_epochs=None` repeats forever. Batches never straddle a
    ragged end: the last partial batch of a finite run is dropped so every batch has the
    same shape (no recompiles). Batches of numpy examples are stacked ([B, T] per key);
    batches of prompt examples (lists and strings) stay a `list[dict]` of length B.

    With `pack_length`, examples (from tokenize_sft, any length) are packed by
    `pack_examples` into rows of `pack_length` with `segment_ids` and `positions`,
    `PACK_WINDOW_PER_ROW * batch_size` examples at a time.

    Iterators from `iter(ds)` have `get_state()` / `set_state(state)`; the state is a
    small JSON-serialisable dict, so a resumed run sees exactly the batches it would have.
    """
    if not records:
        raise ValueError("records is empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
        raise ValueError(f"num_epochs must be None (forever) or a positive int, got {num_epochs!r}")
    if pack_length is not None and (not isinstance(pack_length, int) or pack_length < 2):
        raise ValueError(f"pack_length must be None or an int >= 2, got {pack_length!r}")
    if pack_length is None and num_epochs is not None and len(records) * num_epochs < batch_size:
        raise ValueError(
            f"{len(records)} records x {num_epochs} epochs is less than one batch of {batch_size}"
        )
    ds = grain.MapDataset.source(list(records))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(example_fn)
    it = ds.to_iter_dataset(READ_OPTIONS)
    if pack_length is not None:
        it = it.batch(PACK_WINDOW_PER_ROW * batch_size, batch_fn=list)
        it = grain.experimental.FlatMapIterDataset(it, _PackWindow(pack_length))
    return it.batch(batch_size, drop_remainder=True, batch_fn=collate)


def collate(examples: Sequence[dict]) -> dict[str, np.ndarray] | list[dict]:
    """Stacks examples whose values are all numpy arrays ([T] -> [B, T]); keeps any other
    examples (prompt ids as Python lists, strings for the reward function) as a list."""
    if all(isinstance(v, np.ndarray | np.generic) for v in examples[0].values()):
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    return list(examples)


class _PackWindow(grain.experimental.FlatMapTransform):
    """A window of examples -> the packed rows, one dict of [T] arrays per row.

    grain's flat-map iterator checkpoints the window's start and the row index, and a
    restore re-packs the same window (packing is deterministic), so no examples are
    stored in the iterator state.
    """

    max_fan_out = 1 << 20  # only bounds MapDataset flat maps; rows per window vary

    def __init__(self, pack_length: int):
        self.pack_length = pack_length

    def flat_map(self, element: list[dict]) -> list[dict[str, Any]]:
        packed = pack_examples(element, self.pack_length)  # each [R, T]
        num_rows = packed["tokens"].shape[0]
        return [{k: v[r] for k, v in packed.items()} for r in range(num_rows)]
