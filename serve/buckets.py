"""Shape buckets: a few padded sizes per axis, so jitted steps compile a few times."""

from __future__ import annotations


def power_of_two_buckets(limit: int, minimum: int) -> list[int]:
    """Powers of two from `minimum` below `limit`, then `limit` itself (the last bucket:
    nothing is padded past it)."""
    out, b = [], minimum
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def power_of_two_at_least(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= `n`, and at least `minimum`: a padded size when the
    sizes are open-ended (a batch's longest row, a diff's entries)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def bucket_for(n: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `n`; ValueError when none does."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket, {buckets[-1]}")
