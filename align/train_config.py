"""What every training run decides: where it writes, how long it runs, how it optimises.

`TrainConfig` is the schema; gin binds it (`TrainConfig.learning_rate = 1e-5`). The
algorithm-specific knobs live beside each trainer (`SFTConfig`, `DPOConfig`, ...).
"""

from __future__ import annotations

import dataclasses

import gin
import optax


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    """Checkpoints, metrics.jsonl, TensorBoard events and the resolved config.gin go here."""
    model: str = ""
    """A Hugging Face checkpoint directory (safetensors). Empty: a model with random weights
    from the ModelConfig this gin file binds (include a preset such as 'models/tiny.gin'),
    with the byte tokenizer."""
    train_file: str = ""
    """Local JSONL, JSON or Parquet file with the training records."""
    num_steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per optimizer step (sequences, pairs, or prompts x group size for RL)."""
    grad_accum_steps: int = 1
    """Micro-batches per step; batch_size must be a multiple of it."""
    max_length: int = 512
    """Tokens per training row (prompt + completion)."""
    seed: int = 0
    """Seeds the weights of a preset model, data order and sampling."""
    dtype: str = "float32"
    """Parameter dtype: float32 or bfloat16."""
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"
    """constant, linear (to 0) or cosine (to 0), after warmup_steps of linear warm-up."""
    warmup_steps: int = 0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None disables clipping."""
    save_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 3
    log_every: int = 1
    mesh_shape: tuple[int, int, int] = (1, 1, 1)
    """(data, fsdp, tensor) device mesh; one entry may be -1 to take the remaining devices."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"TrainConfig.batch_size ({self.batch_size}) must be a multiple of "
                f"TrainConfig.grad_accum_steps ({self.grad_accum_steps})"
            )
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(
                f"TrainConfig.lr_schedule must be constant, linear or cosine, "
                f"got {self.lr_schedule!r}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"TrainConfig.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not self.train_file:
            raise ValueError("TrainConfig.train_file is not set (a JSONL, JSON or Parquet file)")
        for name in ("num_steps", "batch_size", "grad_accum_steps", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up to cfg.learning_rate, then constant, linear or cosine decay to 0."""
    decay_steps = max(cfg.num_steps - cfg.warmup_steps, 1)
    after = {
        "constant": optax.constant_schedule(cfg.learning_rate),
        "linear": optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(cfg.learning_rate, decay_steps),
    }[cfg.lr_schedule]
    if not cfg.warmup_steps:
        return after
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW (optax places eps outside the square root, as PyTorch does) after clipping."""
    adamw = optax.adamw(
        learning_rate_schedule(cfg),
        b1=cfg.adam_b1,
        b2=cfg.adam_b2,
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
    if cfg.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
