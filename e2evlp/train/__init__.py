"""Training building blocks: optimizer, learning-rate schedule and checkpoints."""

from e2evlp.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, step_dir
from e2evlp.train.optim import build_optimizer, param_groups, warmup_schedule

__all__ = [
    "build_optimizer",
    "latest_checkpoint",
    "load_checkpoint",
    "param_groups",
    "save_checkpoint",
    "step_dir",
    "warmup_schedule",
]
