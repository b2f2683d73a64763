"""`tandem bench attention`: decode attention on one GPU, tandem's Mosaic GPU kernel
against its peers, timed in the same run on the same random data.

Decode (one new token per sequence, every sequence `context` keys long) is bound by
reading K/V, so each row reports the kernel's bandwidth, bytes = K/V read + q + out,
and that bandwidth as a fraction of a device-to-device copy measured in the same run
(bytes read + bytes written over time). Peers:

  triton  JAX's Pallas Triton `paged_attention` (deprecated since JAX 0.11), the same
          pages in its [K, P, L, H] layout, q pre-scaled (it has no sm_scale argument),
          k_splits 8, 8 pages per compute block, 4 warps (the best of the sweep in
          research/kernels.md);
  xla     the paged cache gathered into [B, S, 2K, H] by XLA, then two einsums;
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")` on a contiguous
          [B, S, K, H] copy of the cache: no paging at all, the bar to reach.

Timing: each implementation is jitted as a chain of `reps` calls (different q, several
cache copies when one would fit in the 50 MB L2, each call's inputs tied to the previous
call's output so that XLA runs them one after the other), dispatched back to back
`inner` times; per-call time = wall time / (inner * reps), median of `samples` such
measurements after a warm-up. Ratios are peer time / tandem time (> 1: tandem faster).
`--mixed` adds a batch of decodes plus prefill chunks, tandem against the reference
(the XLA path the dispatcher falls back to).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from tandem.bench.common import add_flag
from tandem.bench.device_time import device_seconds, matmul_rate, memory_bandwidth
from tandem.pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference

PEERS = ("triton", "xla", "cudnn")
L2_BYTES = 50 * 2**20


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def time_call(fn, args, *, samples: int, inner: int) -> float:
    """Median seconds of one `fn(*args)` call (see the module docstring)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def launch_floor(args) -> dict[str, float]:
    """A trivial op ([B=8, 32, 128] x 2 + 1) chained like the kernels: its wall time per
    call is what launching one kernel costs on this machine, its device time the least a
    kernel takes."""
    x = jnp.ones((args.reps, 8, args.num_q_heads, args.head_dim), jnp.bfloat16)

    def run(x):
        outs = []
        for r in range(args.reps):
            a = jax.lax.optimization_barrier((x[r], *outs[-1:]))[0]
            outs.append(a * 2 + 1)
        return outs

    fn = jax.jit(run)
    wall = time_call(fn, (x,), samples=args.samples, inner=args.inner)
    device = device_seconds(fn, (x,), calls=args.inner)
    return dict(wall_us=wall / args.reps * 1e6, dev_us=device / args.reps * 1e6)


def make_case(rng, *, batch, context, num_q_heads, num_kv_heads, head_dim, page_size, reps):
    """Random decode inputs: `reps` q's and enough paged caches (pages shuffled) that
    cycling through them misses L2."""
    pages_per_seq = context // page_size
    num_pages = batch * pages_per_seq
    kv_bytes = num_pages * page_size * 2 * num_kv_heads * head_dim * 2
    num_caches = min(reps, max(1, math.ceil(4 * L2_BYTES / kv_bytes)))
    keys = jax.random.split(rng, num_caches + 1)
    shape = (num_pages, page_size, 2 * num_kv_heads, head_dim)
    caches = [jax.random.normal(k, shape, jnp.float32).astype(jnp.bfloat16) for k in keys[1:]]
    qs = jax.random.normal(keys[0], (reps, batch, num_q_heads, head_dim), jnp.float32)
    perm = np.random.default_rng(0).permutation(num_pages).astype(np.int32)
    return dict(
        qs=qs.astype(jnp.bfloat16),
        caches=caches,
        page_indices=jnp.asarray(perm.reshape(batch, pages_per_seq)),
        kv_lens=jnp.full((batch,), context, jnp.int32),
        cu_q_lens=jnp.arange(batch + 1, dtype=jnp.int32),
        num_seqs=jnp.array([batch], jnp.int32),
        kv_bytes=kv_bytes,
    )


def gather_kv(cache, page_indices):  # -> [B, S, 2K, H]
    batch, pages_per_seq = page_indices.shape
    _, page_size, num_combined, head_dim = cache.shape
    return cache[page_indices].reshape(batch, pages_per_seq * page_size, num_combined, head_dim)


def implementations(case, *, sm_scale, peers):
    """name -> (jitted fn of (qs, *layouts), layouts per cache); each fn runs every q."""
    pi, lens = case["page_indices"], case["kv_lens"]
    cu, ns = case["cu_q_lens"], case["num_seqs"]

    def tandem(q, cache):
        return ragged_paged_attention(q, cache, lens, pi, cu, ns, sm_scale=sm_scale)

    def xla(q, cache):
        kv = gather_kv(cache, pi)  # [B, S, 2K, H]
        b, n, h = q.shape
        qg = q.reshape(b, kv.shape[2] // 2, -1, h)  # [B, K, G, H]
        s = jnp.einsum("bkgh,bskh->bkgs", qg, kv[:, :, 0::2], preferred_element_type=jnp.float32)
        p = jax.nn.softmax(s * sm_scale, axis=-1).astype(q.dtype)
        return jnp.einsum("bkgs,bskh->bkgh", p, kv[:, :, 1::2]).reshape(b, n, h)

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(
            q[:, None], k, v, scale=sm_scale, implementation="cudnn"
        )[:, 0]

    def triton(q, k_pages, v_pages):
        from jax.experimental.pallas.ops.gpu import paged_attention as triton_paged

        q = (q.astype(jnp.float32) * sm_scale).astype(q.dtype)
        return triton_paged.paged_attention(
            q, k_pages, v_pages, pi, lens, k_splits=8, pages_per_compute_block=8, num_warps=4
        )

    layouts = {"tandem": [(c,) for c in case["caches"]], "xla": [(c,) for c in case["caches"]]}
    fns = {"tandem": tandem, "xla": xla}
    if "cudnn" in peers:
        contiguous = [gather_kv(c, pi) for c in case["caches"]]
        layouts["cudnn"] = [(kv[:, :, 0::2], kv[:, :, 1::2]) for kv in contiguous]
        fns["cudnn"] = cudnn
    if "triton" in peers:
        by_head = [c.transpose(2, 0, 1, 3) for c in case["caches"]]  # [2K, P, L, H]
        layouts["triton"] = [(c[0::2], c[1::2]) for c in by_head]
        fns["triton"] = triton
    if "xla" not in peers:
        del fns["xla"], layouts["xla"]

    def repeated(fn, per_cache):
        width = len(per_cache[0])

        def run(qs, *flat):
            groups = [flat[i : i + width] for i in range(0, len(flat), width)]
            outs = []
            for r in range(qs.shape[0]):
                # Ties every input to this call's q and to the previous call's output:
                # XLA can neither share work between calls (CSE of the xla peer's gather)
                # nor run them concurrently (calls reading one cache would then share L2).
                inputs = (qs[r], *groups[r % len(groups)], *outs[-1:])
                q, *layouts = jax.lax.optimization_barrier(inputs)[: 1 + width]
                outs.append(fn(q, *layouts))
            return outs

        return jax.jit(run), [x for group in per_cache for x in group]

    return {name: repeated(fns[name], layouts[name]) for name in fns}


def decode_rows(args, bandwidth):
    rows = []
    sm_scale = args.head_dim**-0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for batch in args.batch_sizes:
            for context in args.context_lens:
                case = make_case(
                    jax.random.key(batch * 100003 + context),
                    batch=batch,
                    context=context,
                    num_q_heads=args.num_q_heads,
                    num_kv_heads=args.num_kv_heads,
                    head_dim=args.head_dim,
                    page_size=args.page_size,
                    reps=args.reps,
                )
                io_bytes = case["kv_bytes"] + 2 * batch * args.num_q_heads * args.head_dim * 2
                row = dict(batch=batch, context=context, bytes=io_bytes)
                outs = {}
                for name, (fn, flat) in implementations(
                    case, sm_scale=sm_scale, peers=args.peers
                ).items():
                    call_args = (case["qs"], *flat)
                    try:
                        wall = time_call(fn, call_args, samples=args.samples, inner=args.inner)
                        device = device_seconds(fn, call_args, calls=args.inner)
                        row[f"{name}_wall_us"] = wall / args.reps * 1e6
                        row[f"{name}_us"] = device / args.reps * 1e6
                        outs[name] = fn(*call_args)[0]
                    except Exception as e:  # a peer that cannot run this shape is reported
                        row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                if "tandem_us" in row:
                    row["tandem_TBps"] = io_bytes / row["tandem_us"] / 1e6
                    row["frac_copy"] = row["tandem_TBps"] * 1e12 / bandwidth["copy"]
                    row["frac_read"] = row["tandem_TBps"] * 1e12 / bandwidth["read"]
                    for peer in args.peers:
                        if f"{peer}_us" in row:
                            row[f"x_{peer}"] = row[f"{peer}_us"] / row["tandem_us"]
                            row[f"x_{peer}_wall"] = row[f"{peer}_wall_us"] / row["tandem_wall_us"]
                if "tandem" in outs and "xla" in outs:
                    diff = outs["tandem"].astype(jnp.float32) - outs["xla"].astype(jnp.float32)
                    row["max_abs_diff_vs_xla"] = float(jnp.max(jnp.abs(diff)))
                rows.append(row)
                print(json.dumps(row), flush=True)
                del case
    return rows


# (q_len, kv_len) per sequence: a mixed step of the engine (decodes and prefill chunks)
# and a batch of whole prompts.
CHUNKED_CASES = {
    "mixed: 32 decodes @4k + 3 prefill chunks": [(1, 4096)] * 32
    + [(512, 2048), (512, 1024), (256, 4096)],
    "prefill: 8 prompts of 2048": [(2048, 2048)] * 8,
}


def attention_flops(seqs, num_q_heads: int, head_dim: int) -> int:
    """Useful FLOPs (QK^T and PV, 2 per multiply-add) of causal attention: the token at
    position p sees p + 1 keys."""
    visible = sum(q * (kv - q) + q * (q + 1) // 2 for q, kv in seqs)
    return 4 * visible * num_q_heads * head_dim


def chunked_rows(args, matmul_flops: float):
    """Prefill chunks and mixed batches: tandem (device time) against the reference the
    dispatcher would otherwise run (wall time: it is slow enough that launches do not
    count), cuDNN's causal flash attention on a contiguous copy for whole prompts, and
    the useful FLOP/s as a fraction of the bf16 matmul rate measured in the same run."""
    rows = []
    page_size, k, h, n = args.page_size, args.num_kv_heads, args.head_dim, args.num_q_heads
    kw = dict(sm_scale=h**-0.5)
    kernel = jax.jit(lambda *a: ragged_paged_attention(*a, **kw))
    ref = jax.jit(lambda *a: ragged_paged_attention_reference(*a, **kw))
    for seed, (label, seqs) in enumerate(CHUNKED_CASES.items()):
        rng = np.random.default_rng(seed)
        pages_per_seq = -(-max(kv for _, kv in seqs) // page_size)
        num_pages = len(seqs) * pages_per_seq
        num_tokens = sum(q for q, _ in seqs)
        keys = jax.random.split(jax.random.key(seed), 2)
        cache = jax.random.normal(keys[0], (num_pages, page_size, 2 * k, h)).astype(jnp.bfloat16)
        q = jax.random.normal(keys[1], (num_tokens, n, h)).astype(jnp.bfloat16)
        pi = jnp.asarray(rng.permutation(num_pages).astype(np.int32).reshape(len(seqs), -1))
        lens = jnp.asarray([kv for _, kv in seqs], jnp.int32)
        cu = jnp.asarray(np.concatenate([[0], np.cumsum([q_ for q_, _ in seqs])]), jnp.int32)
        a = (q, cache, lens, pi, cu, jnp.array([len(seqs)], jnp.int32))
        flops = attention_flops(seqs, n, h)
        row = dict(case=f"{label} ({num_tokens} tokens)", flops=flops)
        row["tandem_us"] = device_seconds(kernel, a, calls=args.inner) * 1e6
        row["tandem_wall_us"] = time_call(kernel, a, samples=args.samples, inner=2) * 1e6
        row["TFLOPs"] = flops / row["tandem_us"] / 1e6
        row["mfu"] = flops / (row["tandem_us"] * 1e-6) / matmul_flops
        row["reference_us"] = time_call(ref, a, samples=max(3, args.samples // 4), inner=1) * 1e6
        row["x_reference"] = row["reference_us"] / row["tandem_us"]
        diff = kernel(*a).astype(jnp.float32) - ref(*a).astype(jnp.float32)
        row["max_abs_diff_vs_reference"] = float(jnp.max(jnp.abs(diff)))
        if "cudnn" in args.peers and all(ql == kv for ql, kv in seqs) and len(set(seqs)) == 1:
            kv = gather_kv(cache, pi)  # [B, S, 2K, H]: whole prompts, one length
            qb = q.reshape(len(seqs), seqs[0][0], n, h)

            def cudnn(qb, kk, vv):
                return jax.nn.dot_product_attention(
                    qb, kk, vv, is_causal=True, implementation="cudnn", **{"scale": kw["sm_scale"]}
                )

            cargs = (qb, kv[:, :, 0::2], kv[:, :, 1::2])
            row["cudnn_us"] = device_seconds(jax.jit(cudnn), cargs, calls=args.inner) * 1e6
            row["x_cudnn"] = row["cudnn_us"] / row["tandem_us"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def format_rows(rows, bandwidth, peers, floor) -> str:
    lines = [
        f"copy bandwidth (read+write): {bandwidth['copy'] / 1e12:.2f} TB/s, "
        f"read bandwidth: {bandwidth['read'] / 1e12:.2f} TB/s; a trivial op in the same chain: "
        f"{floor['wall_us']:.1f} us wall, {floor['dev_us']:.1f} us device",
        "device time per call (GPU busy); wall = per-call wall time of the chain",
        f"{'B':>4} {'ctx':>6} {'wall us':>8} {'tandem us':>10} {'TB/s':>6}"
        f" {'%copy':>6} {'%read':>6}" + "".join(f" {p + ' us':>10} {'x' + p:>8}" for p in peers),
    ]
    for r in rows:
        if "tandem_us" not in r:
            lines.append(
                f"{r['batch']:>4} {r['context']:>6}  tandem failed: {r.get('tandem_error')}"
            )
            continue
        line = f"{r['batch']:>4} {r['context']:>6} {r['tandem_wall_us']:>8.1f}"
        line += f" {r['tandem_us']:>10.1f} {r['tandem_TBps']:>6.2f}"
        line += f" {100 * r['frac_copy']:>5.1f}% {100 * r['frac_read']:>5.1f}%"
        for p in peers:
            us, x = r.get(f"{p}_us"), r.get(f"x_{p}")
            line += f" {us:>10.1f} {x:>8.2f}" if us else f" {'n/a':>10} {'':>8}"
        lines.append(line)
    return "\n".join(lines)


def format_chunked(rows, matmul_flops: float) -> str:
    lines = [f"bf16 matmul (8192^3): {matmul_flops / 1e12:.0f} TFLOP/s"]
    for r in rows:
        line = (
            f"{r['case']}: tandem {r['tandem_us']:.1f} us ({r['tandem_wall_us']:.1f} wall), "
            f"{r['TFLOPs']:.0f} TFLOP/s, MFU {100 * r['mfu']:.1f}%; "
            f"reference {r['reference_us']:.1f} us, x{r['x_reference']:.1f}"
        )
        if "cudnn_us" in r:
            line += f"; cudnn causal {r['cudnn_us']:.1f} us, x{r['x_cudnn']:.2f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tandem bench attention", description=__doc__.split("\n\n")[0]
    )
    add_flag(parser, "--batch-sizes", type=_ints, default=[8, 64, 128])
    add_flag(parser, "--context-lens", type=_ints, default=[1024, 4096, 16384])
    add_flag(parser, "--num-q-heads", type=int, default=32)
    add_flag(parser, "--num-kv-heads", type=int, default=8)
    add_flag(parser, "--head-dim", type=int, default=128)
    add_flag(parser, "--page-size", type=int, default=16)
    add_flag(parser, "--peers", type=lambda s: [p for p in s.split(",") if p], default=list(PEERS))
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--reps", type=int, default=8, help="kernel calls per jitted call")
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="also time prefill and mixed prefill+decode batches (FLOP/s, MFU)",
    )
    add_flag(parser, "--result-json", default=None)
    args = parser.parse_args(argv)
    if bad := [p for p in args.peers if p not in PEERS]:
        parser.error(f"unknown peers {bad}; choose from {PEERS}")
    if jax.default_backend() != "gpu":
        print(
            f"bench attention needs a GPU; the backend is {jax.default_backend()}", file=sys.stderr
        )
        return 2
    device = jax.devices()[0]
    print(f"device: {device.device_kind}, jax {jax.__version__}", flush=True)
    bandwidth = memory_bandwidth(args.inner)
    floor = launch_floor(args)
    rows = decode_rows(args, bandwidth)
    matmul_flops = matmul_rate(args.inner) if args.mixed else None
    chunked = chunked_rows(args, matmul_flops) if args.mixed else []
    print(format_rows(rows, bandwidth, args.peers, floor))
    if chunked:
        print(format_chunked(chunked, matmul_flops))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(
                dict(
                    device=device.device_kind,
                    jax=jax.__version__,
                    bandwidth_Bps=bandwidth,
                    launch_floor=floor,
                    matmul_flops=matmul_flops,
                    rows=rows,
                    chunked=chunked,
                ),
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
