"""Sizes of the embedded default run; light to import, so the command line shows its defaults in --help."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DemoConfig:
    """Sizes of the default run: ≤ 10 minutes on 2 CPU cores, well under one on a GPU."""

    num_train: int = 400
    num_val: int = 60
    image_size: tuple[int, int] = (96, 128)
    steps: int = 2200
    vqa_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    num_workers: int = 0
