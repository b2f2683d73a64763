"""Device time of a jitted call: how long the GPU is busy running its kernels, read from a
JAX profiler trace (the kernel records CUPTI writes into the device's plane); and the
hardware's rates measured by it in the same run (copy and read bandwidth, bf16 matmul
FLOP/s), the roofline every benchmark divides by.

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
import jax.numpy as jnp
from jax.profiler import ProfileData

COPY_BYTES = 4 * 2**30


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


def memory_bandwidth(calls: int) -> dict[str, float]:
    """Bytes/s measured on COPY_BYTES of data by device time: `copy` is the best of three
    device copies (an XLA memcpy, bf16 x + 1, f32 x * 2; bytes read + bytes written),
    `read` a bf16 sum (bytes read). The kernel's figure is compared with the copy, as the
    issue asks, and with the read, which is what a decode kernel does."""
    x = jnp.ones((COPY_BYTES // 2,), jnp.bfloat16)
    y = jnp.ones((COPY_BYTES // 4,), jnp.float32)
    copies = [
        (jax.jit(lambda a: a.copy()), x),
        (jax.jit(lambda a: a + 1), x),
        (jax.jit(lambda a: a * 2), y),
    ]
    copy = max(2 * a.nbytes / device_seconds(f, (a,), calls=calls) for f, a in copies)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    read = x.nbytes / device_seconds(total, (x,), calls=calls)
    return dict(copy=copy, read=read)


def matmul_rate(calls: int, n: int = 8192) -> float:
    """bf16 FLOP/s of an n x n x n matrix product (f32 accumulation), by device time."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(jnp.bfloat16)
    return 2 * n**3 / device_seconds(jax.jit(jnp.matmul), (a, b), calls=calls)
