"""Plots of a run's metrics.jsonl: one PNG per metric group (`tandem plot RUN_DIR`).

Keys are grouped by name, first match wins (so `time/reward` is timing, not a reward):

    time         time/*                      stacked area: where each step's seconds went
    mismatch     logprob mismatch keys       |logp_engine - logp_trainer| and friends
    clip         *clip*                      clip fractions
    entropy      *entropy*
    kl           *kl*
    length       *length* / *len*            response lengths
    rewards      *reward*  / *margin* / *acc*
    loss         *loss*
    optim        lr, learning_rate, grad_norm

Only groups with at least one key in the file are drawn; other keys are left out. Each
key gets its own panel (scales differ); NaN (null in the file) leaves a gap.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from tandem.align.metrics_log import METRICS_FILE, read_metrics

GROUPS: tuple[tuple[str, str], ...] = (
    ("time", r"^time/"),
    ("mismatch", r"mismatch|logp_diff|logprob_diff"),
    ("clip", r"clip"),
    ("entropy", r"entropy"),
    ("kl", r"(^|[/_])kl($|[/_])"),
    ("length", r"length|(^|[/_])len($|[/_])"),
    ("rewards", r"reward|margin|acc"),
    ("loss", r"loss"),
    ("optim", r"^(lr|learning_rate|grad_norm)$|/(lr|grad_norm)$"),
)
TITLES = {
    "time": "time per step (s)",
    "mismatch": "logprob mismatch (engine vs trainer)",
    "clip": "clip fraction",
    "entropy": "entropy",
    "kl": "KL",
    "length": "response length",
    "rewards": "rewards",
    "loss": "loss",
    "optim": "optimizer",
}


def group_keys(keys: Sequence[str]) -> dict[str, list[str]]:
    """{group: its keys in file order} for the groups present."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        for name, pattern in GROUPS:
            if re.search(pattern, key):
                groups.setdefault(name, []).append(key)
                break
    return groups


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Draws run_dir/metrics.jsonl into out_dir (default run_dir/plots); returns the PNGs."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} (is this a run directory?)")
    rows = sorted(read_metrics(path), key=lambda r: r["step"])
    if not rows:
        raise ValueError(f"{path}: no metrics logged yet")
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("step", "time")))
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, group in group_keys(keys).items():
        if name == "time":
            fig = _stacked_time(plt, rows, group)
        else:
            fig = _panels(plt, rows, group)
        fig.suptitle(f"{TITLES[name]}: {Path(run_dir).name}")
        fig.tight_layout()
        target = out / f"{name}.png"
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps = [r["step"] for r in rows if key in r]
    return steps, [float(r[key]) for r in rows if key in r]


def _panels(plt, rows: list[dict], keys: list[str]):
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys) + 0.6), sharex=True)
    axes = [axes] if len(keys) == 1 else list(axes)
    for ax, key in zip(axes, keys):
        steps, values = _series(rows, key)
        ax.plot(steps, values, lw=1.2, marker="." if len(steps) < 50 else None)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return fig


def _stacked_time(plt, rows: list[dict], keys: list[str]):
    """Stacked area of the time/* keys: the top edge is the step's total time."""
    timed = [r for r in rows if any(k in r for k in keys)]
    steps = [r["step"] for r in timed]
    # A missing or NaN part counts as 0 s so the stack stays defined.
    layers = [[_seconds(r.get(k)) for r in timed] for k in keys]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.stackplot(steps, layers, labels=[k.removeprefix("time/") for k in keys], alpha=0.85)
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.legend(loc="upper left", fontsize=8, ncols=min(4, len(keys)))
    ax.grid(alpha=0.3)
    return fig


def _seconds(value) -> float:
    return float(value) if value is not None and value == value else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    """`tandem plot RUN_DIR [--out DIR]`: writes the PNGs and prints their paths."""
    parser = argparse.ArgumentParser(prog="tandem plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory with metrics.jsonl")
    parser.add_argument("--out", default=None, help="where to write PNGs (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    if not paths:
        print(f"{args.run_dir}: no plottable metrics", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
