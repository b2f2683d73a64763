"""`tandem train ALGORITHM --gin_file F [--gin_param K=V]`: parse gin, run, summarise."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# algorithm -> (module, train function, its config class)
TRAINERS = {
    "sft": ("tandem.align.sft", "train_sft", "SFTConfig"),
    "rm": ("tandem.align.reward_trainer", "train_reward_model", "RewardConfig"),
    "dpo": ("tandem.align.dpo", "train_dpo", "DPOConfig"),
    "ppo": ("tandem.align.rl.ppo", "train_ppo", "PPOConfig"),
    "grpo": ("tandem.align.rl.grpo", "train_grpo", "GRPOConfig"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("algorithm", choices=list(TRAINERS))
    parser.add_argument(
        "--gin_file", action="append", required=True, help="a train config (repeatable)"
    )
    parser.add_argument(
        "--gin_param",
        action="append",
        default=[],
        help="a gin binding on top, e.g. TrainConfig.num_steps=10 (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    return run_train(args.algorithm, args.gin_file, args.gin_param)


def resolve_gin_file(name: str) -> str:
    """A path on disk, or a packaged name such as 'train/sft_tiny.gin'."""
    if os.path.isfile(name):
        return name
    from tandem.configs import config_path

    return config_path(name)


def run_train(algorithm: str, gin_files: list[str], bindings: list[str]) -> int:
    # Imported before parsing: importing them registers align's configurables (TrainConfig,
    # SFTConfig, DPOConfig, ...) with gin, which configs/ leaves to the code that trains.
    import tandem.align.algo_configs  # noqa: F401
    from tandem.align.checkpoint import CheckpointError
    from tandem.align.train_config import TrainConfig
    from tandem.align.trainer import TrainingDiverged
    from tandem.configs import parse

    module_name, fn_name, config_name = TRAINERS[algorithm]
    module = importlib.import_module(module_name)
    parse([resolve_gin_file(f) for f in gin_files], bindings)
    cfg = TrainConfig()
    algo_cfg = getattr(module, config_name)()
    try:
        result = getattr(module, fn_name)(cfg, algo_cfg)
    except (TrainingDiverged, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    shown = {k: v for k, v in result.last_metrics.items() if not k.startswith("time/")}
    summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())[:12])
    resumed = f" (resumed at step {result.start_step})" if result.start_step else ""
    print(f"{algorithm}: {cfg.num_steps} steps in {cfg.run_dir}{resumed}")
    print(f"last step: {summary}")
    return 0
