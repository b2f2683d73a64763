"""What the benchmarks share: random workloads (prompts, lengths, arrival times),
percentile summaries and result tables.

Plain Python and numpy (never jax): `tandem bench serve` runs on a machine with only an
HTTP client.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

# Common English words; each is one token (with its leading space) in the Llama, Qwen and
# Mistral vocabularies, so a text of n of them is about n tokens there.
WORDS = (
    "the of and to in is was for on that with as by at from his her are an be this had not "
    "but which or have one they were you all their has been we more would when there can "
    "new other time year some what about if out so into than only two most first over also "
    "after many made may these such people world city state part later during being where "
    "between under three used game team school house family work music film life war water"
).split()

TABLE_WIDTH = 52


def sample_lengths(rng: np.random.Generator, num: int, mean: int, range_ratio: float) -> list[int]:
    """`num` integer lengths uniform in [mean * (1 - r), mean * (1 + r)], at least 1 (vLLM's
    random dataset; r = 0 gives `mean` every time)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    lo = max(1, int(mean * (1 - range_ratio)))
    hi = max(lo, int(mean * (1 + range_ratio)))
    return rng.integers(lo, hi + 1, size=num).tolist()


def random_text(rng: np.random.Generator, num_words: int) -> str:
    """`num_words` random words: text that any tokenizer takes as about that many tokens."""
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=num_words))


def summarize(values, percentiles=(50, 99)) -> dict[str, float]:
    """mean and the given percentiles (numpy's linear interpolation); zeros when empty."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in percentiles}}
    out = {"mean": float(values.mean())}
    for p in percentiles:
        out[f"p{p}"] = float(np.percentile(values, p))
    return out


def format_table(title: str, rows: list[tuple[str, object] | str]) -> str:
    """vLLM's result layout: a titled box of `label: value` lines; a bare string row is a
    section heading."""
    lines = [f" {title} ".center(TABLE_WIDTH, "=")]
    for row in rows:
        if isinstance(row, str):
            lines.append(f" {row} ".center(TABLE_WIDTH, "-"))
            continue
        label, value = row
        if isinstance(value, float):
            value = f"{value:.2f}"
        lines.append(f"{label + ':':<40}{value:>{TABLE_WIDTH - 40}}")
    lines.append("=" * TABLE_WIDTH)
    return "\n".join(lines)


def add_flag(parser, flag: str, **kwargs) -> None:
    """Adds `--some-flag` (vLLM's spelling) with `--some_flag` (the other tandem commands')
    as an alias."""
    alias = "--" + flag[2:].replace("-", "_")
    parser.add_argument(*([flag, alias] if alias != flag else [flag]), **kwargs)


# Serving workloads: what `bench serve` sends, and when.


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt: str
    output_len: int
    prompt_len: int | None = None  # known for token-exact random prompts; else from usage


def random_requests(
    rng: np.random.Generator,
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    tokenizer=None,
) -> list[BenchRequest]:
    """Random word prompts. With a tokenizer each prompt is cut to exactly its sampled
    length in tokens; without, it has that many words (about as many tokens)."""
    ins = sample_lengths(rng, num, input_len, range_ratio)
    outs = sample_lengths(rng, num, output_len, range_ratio)
    requests = []
    for n_in, n_out in zip(ins, outs):
        text = random_text(rng, n_in)
        if tokenizer is None:
            requests.append(BenchRequest(text, n_out))
            continue
        # Every word is at least one token, so n_in words give at least n_in tokens.
        ids = tokenizer.encode(text, add_special_tokens=False)[:n_in]
        requests.append(BenchRequest(tokenizer.decode(ids), n_out, len(ids)))
    return requests


def jsonl_requests(path: str, num: int | None, output_len: int) -> list[BenchRequest]:
    """The first `num` lines of a JSON-lines file: {"prompt": ..., "output_len": ...?}."""
    requests = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise ValueError(f"{path}:{i + 1}: no 'prompt' field")
            requests.append(BenchRequest(row["prompt"], int(row.get("output_len", output_len))))
            if num is not None and len(requests) == num:
                break
    if not requests:
        raise ValueError(f"{path}: no prompts")
    return requests


def arrival_times(
    num: int, rate: float, burstiness: float, rng: np.random.Generator
) -> np.ndarray:  # f64[num] seconds from the start, the first at 0
    """Gaps are gamma(shape=burstiness, mean=1/rate): burstiness 1 is a Poisson process,
    below 1 burstier (the gaps' variance is 1 / (burstiness * rate^2)), above 1 steadier."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(num)
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(num - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:num]
