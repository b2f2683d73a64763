"""Packing SFT examples into rows of fixed length (greedy first fit).

Each row holds several examples back to back. `segment_ids` number them 1, 2, ... within
the row (0 is padding) so attention stays inside a segment, and `positions` restart at 0
for each segment so RoPE sees every example as if it were alone.

The loss uses next-token targets: position t is trained to predict tokens[t] from t-1.
Across a segment boundary that prediction is meaningless (the previous example's last
token does not predict the next example's first), so loss_mask must be 0 wherever a new
segment starts. Every example's first token is a prompt/BOS token with loss_mask 0 (the
tokenisers guarantee it; `pack_examples` checks it), so copying masks is enough.

An example is trimmed after its last target token: what follows is padding (or trailing
context such as a final user turn) and carries no loss. An example with no target at all
(its completion was truncated away) is dropped. An example longer than the row is cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pack_examples(examples: Sequence[dict], max_length: int) -> dict[str, np.ndarray]:
    """Examples with "tokens" and "loss_mask" ([T_i] each, any length) -> packed rows.

    Returns {"tokens": i32[R, T], "loss_mask": f32[R, T], "segment_ids": i32[R, T],
    "positions": i32[R, T]} with T = max_length and R the number of rows first fit needs.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    free: list[int] = []  # free slots per row
    for i, example in enumerate(examples):
        tokens, mask = _trimmed(example, i, max_length)
        if tokens is None:
            continue
        n = len(tokens)
        row = next((r for r, f in enumerate(free) if f >= n), None)
        if row is None:
            rows.append([])
            free.append(max_length)
            row = len(rows) - 1
        rows[row].append((tokens, mask))
        free[row] -= n
    shape = (len(rows), max_length)
    out = {
        "tokens": np.zeros(shape, np.int32),  # [R, T]
        "loss_mask": np.zeros(shape, np.float32),  # [R, T]
        "segment_ids": np.zeros(shape, np.int32),  # [R, T]
        "positions": np.zeros(shape, np.int32),  # [R, T]
    }
    for r, segments in enumerate(rows):
        start = 0
        for segment_id, (tokens, mask) in enumerate(segments, start=1):
            end = start + len(tokens)
            out["tokens"][r, start:end] = tokens
            out["loss_mask"][r, start:end] = mask
            out["segment_ids"][r, start:end] = segment_id
            out["positions"][r, start:end] = np.arange(len(tokens))
            start = end
    return out


def _trimmed(example: dict, i: int, max_length: int) -> tuple[np.ndarray | None, np.ndarray]:
    for key in ("tokens", "loss_mask"):
        if key not in example:
            raise ValueError(f"example {i}: missing '{key}' (got {sorted(example)})")
    tokens = np.asarray(example["tokens"], np.int32)  # [T_i]
    mask = np.asarray(example["loss_mask"], np.float32)  # [T_i]
    if tokens.ndim != 1 or tokens.shape != mask.shape:
        raise ValueError(
            f"example {i}: tokens {tokens.shape} and loss_mask {mask.shape} must be equal 1-D"
        )
    if len(mask) and mask[0] != 0:
        raise ValueError(
            f"example {i}: loss_mask[0] is {mask[0]}; the first token of an example cannot be "
            f"a target, and in a packed row it would be trained to follow the previous example"
        )
    targets = np.flatnonzero(mask[:max_length])
    if len(targets) == 0:
        return None, mask
    n = int(targets[-1]) + 1
    return tokens[:n], mask[:n]
