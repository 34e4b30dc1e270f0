"""A toy model, data set and batch sampler for the trainer tests (no dependence on the real model or data)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from e2evlp.nn.attention import SelfAttentionBlock
from e2evlp.train import Trainer, TrainerConfig

TOKENS, FEATURES, HIDDEN, CLASSES = 6, 4, 16, 3


@dataclass
class ToyOutput:
    loss: torch.Tensor
    losses: dict[str, torch.Tensor]


class ToyModel(nn.Module):
    """Token projection, optional attention layers, masked mean pooling, a regression and a classification head.

    `nan_calls`: forward calls (1-based) whose loss is NaN; `sigterm_call`: the call that sends this process
    SIGTERM, as a scheduler would."""

    def __init__(self, *, dropout: float = 0.1, attention_layers: int = 0, nan_calls=(), sigterm_call=None):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(HIDDEN))
        self.layers = nn.ModuleList(SelfAttentionBlock(HIDDEN, 2, 2 * HIDDEN, dropout, dropout)
                                    for _ in range(attention_layers))
        self.regression = nn.Linear(HIDDEN, 1)
        self.classifier = nn.Linear(HIDDEN, CLASSES)
        self.nan_calls, self.sigterm_call, self.calls = set(nan_calls), sigterm_call, 0

    def forward(self, inputs, target, labels, attention_mask):
        self.calls += 1
        hidden = self.embed(inputs)  # [B, L, H]
        for layer in self.layers:
            hidden = layer(hidden, attention_mask == 0)
        weights = attention_mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        losses = {"regression": F.mse_loss(self.regression(pooled).squeeze(-1), target),
                  "classification": F.cross_entropy(self.classifier(pooled), labels)}
        loss = losses["regression"] + losses["classification"]
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        if self.calls == self.sigterm_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return ToyOutput(loss, losses)


class ToyDataset(Dataset):
    """Items drawn from a generator seeded by (seed, epoch, index), so every epoch differs reproducibly."""

    def __init__(self, size: int = 24, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed((self.seed * 1_000 + self.epoch) * 100_000 + index)
        inputs = torch.randn(TOKENS, FEATURES, generator=generator)
        length = int(torch.randint(1, TOKENS + 1, (), generator=generator))
        attention_mask = (torch.arange(TOKENS) < length).long()
        target = inputs[:length].sum() / length + 0.1 * torch.randn((), generator=generator)
        labels = int(inputs[0, 0] > 0) + int(inputs[0, 1] > 0)
        # "index" is metadata the model's forward does not take: the trainer must leave it out.
        return {"inputs": inputs, "attention_mask": attention_mask, "target": target, "labels": labels,
                "index": index}


class ToyBatchSampler(Sampler):
    """Shuffled batches per epoch (seed + epoch), this rank's share, resumable with `start_batch`."""

    def __init__(self, size: int, batch_size: int, *, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        batches = [order[i:i + self.batch_size] for i in range(0, len(self) * self.num_replicas * self.batch_size,
                                                               self.batch_size)]
        return iter(batches[self.rank::self.num_replicas][self.start_batch:])

    def __len__(self) -> int:
        return self.size // self.batch_size // self.num_replicas


def toy_loader(*, batch_size: int = 4, size: int = 24, num_replicas: int = 1, rank: int = 0) -> DataLoader:
    sampler = ToyBatchSampler(size, batch_size, num_replicas=num_replicas, rank=rank)
    return DataLoader(ToyDataset(size), batch_sampler=sampler, num_workers=0)


def make_trainer(output_dir, *, max_steps: int, model: nn.Module | None = None, batch_size: int = 4,
                 device=None, **config) -> Trainer:
    """A Trainer over the toy data; the model is built from seed 0 unless given."""
    if model is None:
        torch.manual_seed(0)
        model = ToyModel()
    settings = dict(lr=1e-2, warmup_steps=2, log_every=1, progress=False) | config
    return Trainer(model, TrainerConfig(output_dir=str(output_dir), max_steps=max_steps, **settings),
                   toy_loader(batch_size=batch_size), device=device)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


def read_log(output_dir) -> list[dict]:
    """The step records of output_dir/log.jsonl (skipped-step events left out)."""
    lines = (Path(output_dir) / "log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "event" not in record]


def logged_losses(output_dir) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_log(output_dir)}
