"""`tandem bench fairness`: two backlogged clients on one Engine, FCFS against VTC.

The VTC paper's overload setting (Sheng et al., OSDI'24): client A sends 4x
the requests of client B and both always have work waiting. Here the arrivals are a
closed loop in engine steps: after every step each client tops its queue back up, A to
`--backlog-a` requests waiting and B to `--backlog-b` (a request waits until its first
token). FCFS admits in arrival order, so A's service is about backlog-a / backlog-b times
B's; VTC admits the client with the smaller counter, so both get about the same.

Service is VTC's weighted token count, read from `engine.stats()["clients"]`:
w_in = 1 per prompt token (charged at admission), w_out = 2 per generated token.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from tandem.bench.common import add_flag, format_table
from tandem.model.loading import load
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.sampling_params import SamplingParams

W_IN, W_OUT = 1.0, 2.0
CLIENTS = ("A", "B")


@dataclasses.dataclass(frozen=True)
class FairnessResult:
    policy: str
    num_steps: int
    service: dict[str, float]  # weighted tokens per client over the run
    max_difference: float  # max over steps of |service A - service B|
    num_finished: dict[str, int]

    @property
    def rates(self) -> dict[str, float]:
        """Weighted tokens per step."""
        return {c: s / self.num_steps for c, s in self.service.items()}

    @property
    def ratio(self) -> float:
        return self.service["A"] / max(self.service["B"], 1e-9)


def weighted_service(stats: dict, client: str) -> float:
    served = stats["clients"].get(client, {"prompt_tokens": 0, "generated_tokens": 0})
    return W_IN * served["prompt_tokens"] + W_OUT * served["generated_tokens"]


def run_fairness(
    model,
    tokenizer,
    policy: str,
    *,
    num_steps: int = 200,
    backlog: dict[str, int] | None = None,
    input_len: int = 32,
    output_len: int = 16,
    seed: int = 0,
    **engine_config,
) -> FairnessResult:
    """Runs `num_steps` engine steps of the closed-loop two-client workload. Prompts are
    random tokens (no shared prefixes, so the prefix cache never discounts a client)."""
    backlog = backlog or {"A": 8, "B": 2}
    engine = Engine(model, tokenizer, EngineConfig(policy=policy, seed=seed, **engine_config))
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    waiting = {c: set() for c in CLIENTS}  # submitted, no token yet
    owner: dict[str, str] = {}
    num_finished = dict.fromkeys(CLIENTS, 0)
    num_submitted = 0
    max_difference = 0.0
    for _ in range(num_steps):
        for client in CLIENTS:
            while len(waiting[client]) < backlog[client]:
                request_id = f"{client}-{num_submitted}"
                num_submitted += 1
                prompt = rng.integers(0, vocab, size=input_len).tolist()
                engine.add_request(request_id, prompt, params, client=client)
                waiting[client].add(request_id)
                owner[request_id] = client
        for out in engine.step():
            waiting[owner[out.request_id]].discard(out.request_id)
            if out.finished:
                num_finished[owner.pop(out.request_id)] += 1
        stats = engine.stats()
        gap = abs(weighted_service(stats, "A") - weighted_service(stats, "B"))
        max_difference = max(max_difference, gap)
    stats = engine.stats()
    service = {c: weighted_service(stats, c) for c in CLIENTS}
    return FairnessResult(policy, num_steps, service, max_difference, num_finished)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem bench fairness", description=__doc__.split("\n")[0]
    )
    add_flag(parser, "--model", default="models/tiny.gin", help="checkpoint dir or gin preset")
    add_flag(parser, "--policies", nargs="+", default=["fcfs", "vtc"])
    add_flag(parser, "--num-steps", type=int, default=200)
    add_flag(parser, "--backlog-a", type=int, default=8, help="requests A keeps waiting")
    add_flag(parser, "--backlog-b", type=int, default=2, help="requests B keeps waiting")
    add_flag(parser, "--input-len", type=int, default=32)
    add_flag(parser, "--output-len", type=int, default=16)
    add_flag(parser, "--max-num-seqs", type=int, default=8)
    add_flag(parser, "--max-num-batched-tokens", type=int, default=64)
    add_flag(parser, "--page-size", type=int, default=16)
    add_flag(parser, "--seed", type=int, default=0)
    return parser


def results_table(results: list[FairnessResult], title: str = "Fairness") -> str:
    rows: list = []
    for r in results:
        rows += [
            f"policy {r.policy}, {r.num_steps} steps",
            ("Service rate A (weighted tok/step)", r.rates["A"]),
            ("Service rate B (weighted tok/step)", r.rates["B"]),
            ("Ratio A / B", r.ratio),
            ("Max service difference (tokens)", r.max_difference),
            ("Requests finished A / B", f"{r.num_finished['A']} / {r.num_finished['B']}"),
        ]
    return format_table(title, rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, tokenizer, _ = load(args.model, seed=args.seed)
    results = [
        run_fairness(
            model,
            tokenizer,
            policy,
            num_steps=args.num_steps,
            backlog={"A": args.backlog_a, "B": args.backlog_b},
            input_len=args.input_len,
            output_len=args.output_len,
            seed=args.seed,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            page_size=args.page_size,
        )
        for policy in args.policies
    ]
    print(
        f"w_in={W_IN:g} per prompt token, w_out={W_OUT:g} per generated token; "
        f"A keeps {args.backlog_a} requests waiting, B keeps {args.backlog_b}; "
        f"max_num_seqs {args.max_num_seqs}, max_num_batched_tokens {args.max_num_batched_tokens}"
    )
    print(results_table(results, f"Fairness: backlog A {args.backlog_a} / B {args.backlog_b}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
