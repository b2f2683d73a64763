"""Benchmark programs: `serve` (HTTP load against any OpenAI-compatible server),
`throughput` (offline engine vs. no-cache recompute), `fairness` (FCFS vs. VTC) and
`attention` (the GPU paged-attention kernel vs. Triton, XLA and cuDNN, on an H200)."""
