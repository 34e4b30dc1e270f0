"""Training logs on rank 0: a tqdm bar, JSON-lines records, TensorBoard scalars, and a throughput window."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

LOG_NAME = "log.jsonl"
# Masks whose entries count as tokens for the throughput figures.
TOKEN_MASKS = ("attention_mask", "caption_mask")


def batch_size(batch: dict) -> int:
    """The leading size of the batch's first tensor (0 when it holds none)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim:
            return value.shape[0]
    return 0


def batch_tokens(batch: dict) -> int:
    """Non-padding text tokens: the sum of the batch's `attention_mask` and `caption_mask` entries."""
    return sum(int(batch[name].sum()) for name in TOKEN_MASKS if isinstance(batch.get(name), torch.Tensor))


def require_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ImportError("TrainerConfig.tensorboard=True needs the 'tensorboard' package (pip install tensorboard)")


def _json_number(value: float | None) -> float | str | None:
    # JSON has no NaN or infinity; a string keeps the record readable by every parser.
    return value if value is None or math.isfinite(value) else str(value)


def _event_message(record: dict) -> str:
    """The console line of an event record."""
    if record["event"] == "resumed":
        resumed = record["resumed_from"]
        return f"resumed from {resumed['checkpoint']} at step {resumed['step']}"
    if record["event"] == "stopped_by_sigterm":
        return (f"stopped by SIGTERM at step {record['step']}: checkpoint {record['checkpoint']} "
                f"(rerun the same command to resume)")
    return f"step {record['step']}: {record['event']} (loss {record['loss']})"


@dataclass
class Window:
    """Sums over the steps since the last record; samples and tokens are this rank's, the loss is all ranks'."""

    started: float = field(default_factory=time.perf_counter)
    finite_steps: int = 0
    loss: float = 0.0
    task_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_norm: float | None = None
    samples: int = 0
    tokens: int = 0

    def add(self, *, loss: float, task_losses: dict[str, torch.Tensor], grad_norm: float, finite: bool,
            samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens
        self.grad_norm = grad_norm
        if finite:
            self.finite_steps += 1
            self.loss += loss
            for name, value in task_losses.items():
                self.task_losses[name] = self.task_losses.get(name, 0.0) + value

    def averages(self) -> tuple[float | None, dict[str, float]]:
        """The window's mean loss and mean task losses over its finite steps (None / {} without one)."""
        if not self.finite_steps:
            return None, {}
        names = list(self.task_losses)
        values = torch.stack([self.task_losses[n].float() for n in names]).tolist() if names else []
        return self.loss / self.finite_steps, {n: v / self.finite_steps for n, v in zip(names, values)}


class RunLogger:
    """Writes the run's records on rank 0 (`enabled`); a no-op elsewhere.

    Each record is one line of `output_dir/log.jsonl`: step, epoch, lr (per parameter-group name), loss and
    losses (per task, averaged over the window; only for models that report them in ``output.losses``),
    grad_norm (the last step's), samples_per_s and tokens_per_s
    (all ranks), skipped_nonfinite (so far), elapsed (seconds of training, summed over resumes). A skipped step
    adds a line with "event": "skipped_nonfinite" and its step, epoch and loss; a resumed run starts with a line
    "event": "resumed", its step and epoch, and "resumed_from": {"checkpoint", "step"}; a run stopped by SIGTERM
    ends with "event": "stopped_by_sigterm", its step, epoch and checkpoint."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, total_steps: int, initial_step: int,
                 progress: bool, tensorboard: bool):
        self.enabled = enabled
        self.bar = self.jsonl = self.writer = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output_dir / LOG_NAME, "a", encoding="utf-8")
        if progress:
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)
        if tensorboard:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=initial_step + 1)

    def step(self, loss: float, lr: float) -> None:
        """Advances the bar by one optimizer step."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", refresh=False)
            self.bar.update(1)

    def record(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: ({n: _json_number(v) if isinstance(v, float) else v for n, v in value.items()}
                     if isinstance(value, dict) else _json_number(value) if isinstance(value, float) else value)
                 for k, value in record.items()}
        self.jsonl.write(json.dumps(clean) + "\n")
        self.jsonl.flush()
        if "event" in record:
            message = _event_message(record)
            if self.bar is not None:
                self.bar.write(message)
            else:
                print(message, flush=True)
        elif self.writer is not None:
            for key in ("loss", "grad_norm", "samples_per_s", "tokens_per_s"):
                if isinstance(record[key], float) and math.isfinite(record[key]):
                    self.writer.add_scalar(f"train/{key}", record[key], record["step"])
            for group in ("lr", "losses"):
                for name, value in record.get(group, {}).items():
                    self.writer.add_scalar(f"{group}/{name}", value, record["step"])

    def close(self) -> None:
        for handle in (self.bar, self.jsonl, self.writer):
            if handle is not None:
                handle.close()
