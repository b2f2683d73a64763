"""Benchmark programs: `serve` (HTTP load against any OpenAI-compatible server),
`throughput` (offline engine vs. no-cache recompute) and `fairness` (FCFS vs. VTC)."""
