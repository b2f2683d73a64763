"""Per-step training metrics: a JSON-lines file, TensorBoard scalars and a progress bar.

    log = MetricsLogger(run_dir, total_steps=1000, start_step=resumed_step)
    log.log(step, {"loss": 0.7, "kl": 0.01, "time/rollout": 1.2})
    log.close()

`run_dir/metrics.jsonl` gets one line per call: {"step": s, "time": unix seconds, ...}.
Values are written as floats; NaN and +-Inf are written as JSON `null` (strict JSON, so
any reader can parse the file; `read_metrics` turns null back into NaN). The trainer stops
on a NaN loss anyway, and its last line still shows which metric went bad.

`start_step` is the number of steps already done (the checkpoint a run resumes from). Lines
with step > start_step are dropped first: they were logged after that checkpoint and will
be logged again, so the file ends up with each step once. The same holds for TensorBoard
(`purge_step`). A fresh run (start_step 0) in an old run_dir therefore starts an empty file.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.gin"
TB_DIR = "tb"
# The progress bar shows the loss and the first metric matching each of these, at most two.
BAR_PATTERNS = ("reward", "acc", "kl", "grad_norm")


def write_config(run_dir: str | os.PathLike, text: str) -> str:
    """Saves the resolved gin config as run_dir/config.gin; returns the path."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, CONFIG_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (null -> NaN). A torn last line (a killed run) is skipped."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: the write was cut short
                break
            raise ValueError(f"{path} line {number}: bad JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path} line {number}: a row needs an integer 'step'")
        rows.append({k: math.nan if v is None else v for k, v in row.items()})
    return rows


class MetricsLogger:
    """Writes each step's scalars to metrics.jsonl, TensorBoard and a tqdm bar."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
    ):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if not isinstance(start_step, int) or not 0 <= start_step <= total_steps:
            raise ValueError(f"start_step must be an int in [0, {total_steps}], got {start_step}")
        self.run_dir = os.fspath(run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.path = os.path.join(self.run_dir, METRICS_FILE)
        self._drop_from(start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step makes TensorBoard discard events at or after it from earlier files.
            self._writer = SummaryWriter(
                os.path.join(self.run_dir, TB_DIR),
                purge_step=start_step + 1 if start_step else None,
            )
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._last_step = start_step

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends `metrics` for `step` (values: Python, numpy or 0-d jax scalars)."""
        if not isinstance(step, int):
            raise ValueError(f"step must be an int, got {type(step).__name__}")
        values = {}
        for key, value in metrics.items():
            if key in ("step", "time") or not isinstance(key, str):
                raise ValueError(f"metric name {key!r} is reserved or not a string")
            try:
                values[key] = float(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metric {key!r} is not a scalar: {value!r}") from e
        row = {"step": step, "time": time.time()}
        row.update({k: v if math.isfinite(v) else None for k, v in values.items()})
        # One write per line and a flush: a kill leaves at most one torn last line.
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)
        if self._bar is not None:
            self._bar.update(max(0, step - self._last_step))
            self._bar.set_postfix(_bar_fields(values), refresh=False)
        self._last_step = max(self._last_step, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drop_from(self, start_step: int) -> None:
        """Rewrites metrics.jsonl without rows after start_step (atomic replace)."""
        if not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for row in kept:
                clean = {k: None if _not_finite(v) else v for k, v in row.items()}
                f.write(json.dumps(clean, allow_nan=False) + "\n")
        os.replace(tmp, self.path)


def _not_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _bar_fields(values: dict[str, float]) -> dict[str, str]:
    keys = []
    for pattern in BAR_PATTERNS:
        match = next((k for k in values if pattern in k and k not in keys), None)
        if match is not None and len(keys) < 2:
            keys.append(match)
    if "loss" in values:
        keys.insert(0, "loss")
    return {k: f"{values[k]:.4g}" for k in keys}
