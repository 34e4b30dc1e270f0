"""Training: the Trainer, distributed helpers, optimizer, learning-rate schedule and checkpoints."""

from e2evlp.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint, step_dir
from e2evlp.train.distributed import (
    all_reduce_mean,
    barrier,
    init_distributed,
    is_main_process,
    rank,
    world_size,
    wrap_model,
)
from e2evlp.train.optim import build_optimizer, param_groups, warmup_schedule
from e2evlp.train.trainer import Trainer, TrainerConfig

__all__ = [
    "Trainer",
    "TrainerConfig",
    "all_reduce_mean",
    "barrier",
    "build_optimizer",
    "init_distributed",
    "is_main_process",
    "latest_checkpoint",
    "load_checkpoint",
    "param_groups",
    "prune_checkpoints",
    "rank",
    "save_checkpoint",
    "step_dir",
    "warmup_schedule",
    "world_size",
    "wrap_model",
]
