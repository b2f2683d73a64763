"""Device time of a jitted call: how long the GPU is busy running its kernels, read from a
JAX profiler trace (the kernel records CUPTI writes into the device's plane).

Wall-clock time per call also counts what the host spends launching kernels. Where
launches are slow (on the benchmark VM a trivial elementwise op in a chain of calls costs
~16 us of wall time per call, against ~1.5 us of kernel time) a small decode call is
launch-bound, and the wall figure says more about the VM than about the kernel. Busy
time is the union of the kernels' [start, end) intervals, so gaps between kernels (the
GPU waiting for the host) are left out and overlapping kernels are counted once.
"""

from __future__ import annotations

import glob
import os
import tempfile

import jax
from jax.profiler import ProfileData


def kernel_intervals(data: ProfileData, device: str = "/device:GPU:0") -> list[tuple[int, int]]:
    """[(start_ns, end_ns)] of every kernel (and device copy) on the device's streams."""
    planes = [p for p in data.planes if p.name == device]
    if not planes:
        names = sorted(p.name for p in data.planes)
        raise ValueError(f"no plane {device!r} in the profile; planes: {names}")
    lines = [line for line in planes[0].lines if line.name.startswith("Stream")]
    if not lines:
        names = [line.name for line in planes[0].lines]
        raise ValueError(f"plane {device!r} has no stream lines; lines: {names}")
    return sorted((e.start_ns, e.end_ns) for line in lines for e in line.events)


def busy_ns(intervals: list[tuple[int, int]]) -> float:
    """Length of the union of sorted [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in intervals:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def device_seconds(fn, args, *, calls: int) -> float:
    """GPU busy seconds per `fn(*args)`, over `calls` calls traced after a warm-up one."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        if len(paths) != 1:
            raise RuntimeError(f"expected one .xplane.pb under {trace_dir}, found {paths}")
        data = ProfileData.from_file(paths[0])
    return busy_ns(kernel_intervals(data)) / calls / 1e9
