"""The training loop: AMP, gradient accumulation, DDP/FSDP2, exact resume, non-finite and SIGTERM handling."""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import signal
import threading
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from e2evlp.devices import batch_to_device
from e2evlp.train import distributed as dist_utils
from e2evlp.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
)
from e2evlp.train.logging import RunLogger, Window, batch_size, batch_tokens, require_tensorboard
from e2evlp.train.optim import DECAYS, build_optimizer, warmup_schedule

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
COMPILE_MODES = ("none", "default", "max-autotune")
# Settings that shape the optimization itself: changing them on resume does not continue the same run.
TRAJECTORY_SETTINGS = ("lr", "backbone_lr", "weight_decay", "warmup_steps", "decay", "min_lr_ratio",
                       "grad_accum_steps", "max_grad_norm", "precision", "seed")


@dataclass
class TrainerConfig:
    output_dir: str
    max_steps: int  # optimizer steps (a skipped non-finite step counts as one)
    lr: float = 1e-4
    backbone_lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    decay: str = "cosine"  # "cosine" | "linear"
    min_lr_ratio: float = 0.0
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0  # None or 0 disables clipping (the norm is still logged)
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp16" (GradScaler) | "fp32"
    distributed: str = "ddp"  # "ddp" | "fsdp" (FSDP2 fully_shard); only used when WORLD_SIZE > 1
    find_unused_parameters: bool = False  # DDP: a task model that leaves trunk parts unused (VQA: the decoder)
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # older step-* checkpoints are deleted; 0 keeps them all
    log_every: int = 10
    max_nonfinite_steps: int = 10  # consecutive non-finite losses before stopping with a clear error
    seed: int = 0
    progress: bool = True  # tqdm on rank 0
    tensorboard: bool = False  # needs the tensorboard package
    resume: bool = True  # continue from the latest complete checkpoint in output_dir
    compile: str = "none"  # "none" | "default" | "max-autotune": torch.compile of the model's forward (one graph)
    cuda_graphs: bool = False  # capture and replay the compiled step with CUDA graphs (needs compile, CUDA)

    def __post_init__(self):
        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        # Predicates, evaluated in order, so that a value of the wrong type fails its own check by name.
        checks = {
            "output_dir": (lambda: bool(str(self.output_dir)), "a non-empty path"),
            "max_steps": (lambda: is_int(self.max_steps) and self.max_steps >= 1, "an int >= 1"),
            "lr": (lambda: is_number(self.lr) and self.lr > 0, "a number > 0"),
            "backbone_lr": (lambda: is_number(self.backbone_lr) and self.backbone_lr >= 0, "a number >= 0"),
            "weight_decay": (lambda: is_number(self.weight_decay) and self.weight_decay >= 0, "a number >= 0"),
            "warmup_steps": (lambda: is_int(self.warmup_steps) and 0 <= self.warmup_steps <= self.max_steps,
                             "an int in [0, max_steps]"),
            "decay": (lambda: self.decay in DECAYS, f"one of {DECAYS}"),
            "min_lr_ratio": (lambda: is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            "grad_accum_steps": (lambda: is_int(self.grad_accum_steps) and self.grad_accum_steps >= 1,
                                 "an int >= 1"),
            "max_grad_norm": (lambda: self.max_grad_norm is None or (is_number(self.max_grad_norm)
                                                                     and self.max_grad_norm >= 0), "None or >= 0"),
            "precision": (lambda: self.precision in PRECISIONS, f"one of {PRECISIONS}"),
            "distributed": (lambda: self.distributed in dist_utils.MODES, f"one of {dist_utils.MODES}"),
            "save_every": (lambda: is_int(self.save_every) and self.save_every >= 0, "an int >= 0"),
            "keep_last": (lambda: is_int(self.keep_last) and self.keep_last >= 0, "an int >= 0"),
            "log_every": (lambda: is_int(self.log_every) and self.log_every >= 1, "an int >= 1"),
            "max_nonfinite_steps": (lambda: is_int(self.max_nonfinite_steps) and self.max_nonfinite_steps >= 1,
                                    "an int >= 1"),
            "compile": (lambda: self.compile in COMPILE_MODES, f"one of {COMPILE_MODES}"),
            "cuda_graphs": (lambda: isinstance(self.cuda_graphs, bool) and (not self.cuda_graphs
                                                                            or self.compile != "none"),
                            "a bool, and true only with compile set (CUDA graphs replay a compiled step)"),
        }
        for name, (valid, requirement) in checks.items():
            if not valid():
                raise ValueError(f"TrainerConfig.{name} must be {requirement}, got {getattr(self, name)!r}")
        self.output_dir = str(self.output_dir)


def compile_model(model: nn.Module, mode: str, cuda_graphs: bool, *, fullgraph: bool = True) -> nn.Module:
    """`model` under torch.compile with Inductor: ``mode`` "default" or "max-autotune"; ``cuda_graphs`` captures the
    compiled forward and backward as CUDA graphs and replays them, and raises naming the reason (a host sync, a
    CPU tensor, dynamic shapes, ...) where Inductor would otherwise run a graph without them."""
    if mode not in COMPILE_MODES[1:]:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES[1:]}, got {mode!r}")
    if not cuda_graphs:
        return torch.compile(model, fullgraph=fullgraph,
                             mode="max-autotune-no-cudagraphs" if mode == "max-autotune" else None)
    options = {"triton.cudagraphs": True, "triton.cudagraph_or_error": True, "max_autotune": mode == "max-autotune"}
    return torch.compile(model, fullgraph=fullgraph, dynamic=False, options=options)


def _forward_keys(module: nn.Module) -> set[str] | None:
    """The batch keys `module.forward` accepts by name; None when it takes **kwargs (then all of them)."""
    parameters = inspect.signature(module.forward).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _mean_over_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Each name's mean over the ranks that report it."""
    names = dict.fromkeys(name for losses in per_rank for name in losses)
    return {name: sum(r[name] for r in per_rank if name in r) / sum(name in r for r in per_rank) for name in names}


@dataclass
class _Accumulated:
    """One optimizer step's micro-batches: summed loss (on the device), task losses, this rank's samples, tokens."""

    loss: torch.Tensor
    matching_failures: torch.Tensor  # refused matching problems (PretrainingOutput.matching_failures), summed
    task_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0
    tokens: int = 0

    def count(self, batch: dict) -> None:
        """Adds a micro-batch's samples and tokens."""
        self.samples += batch_size(batch)
        self.tokens += batch_tokens(batch)

    def add(self, output, loss: torch.Tensor, accum: int) -> None:
        """Adds a micro-batch's loss share (already divided by `accum`) and its task losses."""
        self.loss += loss
        failures = getattr(output, "matching_failures", None)
        if failures is not None:
            self.matching_failures += failures.detach().float()
        for name, value in (getattr(output, "losses", None) or {}).items():
            self.task_losses[name] = self.task_losses.get(name, 0.0) + value.detach().float() / accum


@dataclass
class _Run:
    """Where one `train` call stands: why it stopped, the last record's losses, the last checkpoint, its windows."""

    started: float
    checkpoint: Path | None
    resumed_from: dict | None = None
    stopped: str = "done"
    loss: float | None = None
    task_losses: dict[str, float] = field(default_factory=dict)
    window: Window = field(default_factory=Window)
    totals: Window = field(default_factory=Window)


class Trainer:
    """Trains `model` (``model(**batch).loss``, optionally ``.losses`` per task) for `config.max_steps`
    optimizer steps over `train_loader`, repeating it by epochs, under torchrun or in one process.

    Optimizer and scheduler default to `build_optimizer` and `warmup_schedule` from the config (under FSDP2,
    which replaces the parameters, they must be left to the trainer). Batches are dicts; only the keys the
    model's forward names are passed on. Resuming reproduces an uninterrupted run exactly when each epoch's
    order is a function of the epoch (a `set_epoch` on the dataset, sampler or batch sampler, as with
    DistributedSampler or SizeBucketBatchSampler): a plain shuffling DataLoader gives a different order."""

    def __init__(self, model: nn.Module, config: TrainerConfig, train_loader, *, optimizer=None, scheduler=None,
                 device=None):
        self.config = config
        self.device = dist_utils.init_distributed(device)
        self.is_main = dist_utils.is_main_process()
        self.module = model.to(self.device)
        self.model = dist_utils.wrap_model(self.module, config.distributed, self.device,
                                           find_unused_parameters=config.find_unused_parameters)
        self.sharded = dist_utils.is_sharded(self.model)
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"TrainerConfig.cuda_graphs needs a CUDA device, got {self.device}")
        # What the step calls; `model` stays the (wrapped) module that checkpoints and gradient sync work on.
        # Under DDP/FSDP the compiler splits the graph at the gradient buckets itself.
        self.step_model = self.model if config.compile == "none" else compile_model(
            self.model, config.compile, config.cuda_graphs, fullgraph=dist_utils.world_size() == 1)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if optimizer is None:
            optimizer = build_optimizer(self.module, lr=config.lr, backbone_lr=config.backbone_lr,
                                        weight_decay=config.weight_decay)
        model_params = {id(p) for p in self.module.parameters()}
        if any(id(p) not in model_params for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("optimizer holds tensors that are not the model's parameters (under FSDP2, which "
                             "replaces them, pass optimizer=None and scheduler=None)")
        if scheduler is None:
            scheduler = warmup_schedule(optimizer, warmup_steps=config.warmup_steps, total_steps=config.max_steps,
                                        decay=config.decay, min_ratio=config.min_lr_ratio)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader = train_loader
        auto = torch.bfloat16 if self.device.type == "cuda" else None
        self.autocast_dtype = {"auto": auto, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[
            config.precision]
        self.scaler = None
        if config.precision == "fp16":
            # Sharded gradients: the overflow check must be agreed over all ranks.
            scaler_type = ShardedGradScaler if self.sharded else torch.amp.GradScaler
            self.scaler = scaler_type(self.device.type)
        self.forward_keys = _forward_keys(self.module)
        if config.tensorboard:
            require_tensorboard()
        self.step = self.epoch = self.batch_in_epoch = 0
        self.skipped_nonfinite = self.consecutive_nonfinite = 0
        self.elapsed = 0.0
        self.recent_nonfinite: deque[float] = deque(maxlen=config.max_nonfinite_steps)
        self._batches = None
        self._last_lrs: dict[str, float] = {}
        self._stop_requested = False

    # Data ------------------------------------------------------------------------------------------------

    def _start_epoch(self):
        """An iterator over the current epoch's batches from `batch_in_epoch` on (the resume position)."""
        loader = self.train_loader
        for part in (getattr(loader, "dataset", None), getattr(loader, "sampler", None)):
            if callable(getattr(part, "set_epoch", None)):
                part.set_epoch(self.epoch)
        skip = self.batch_in_epoch
        set_epoch = getattr(getattr(loader, "batch_sampler", None), "set_epoch", None)
        if callable(set_epoch):
            if "start_batch" in inspect.signature(set_epoch).parameters:
                set_epoch(self.epoch, start_batch=skip)
                skip = 0
            else:
                set_epoch(self.epoch)
        # A DataLoader draws its base seed from the global generator: shielding it keeps dropout's random
        # stream the same whether an epoch starts here or in a resumed run.
        with torch.random.fork_rng(devices=[]):
            batches = iter(loader)
            for _ in range(skip):
                next(batches, None)
        return batches

    def _next_batch(self) -> dict:
        while True:
            if self._batches is None:
                self._batches = self._start_epoch()
            batch = next(self._batches, None)
            if batch is not None:
                self.batch_in_epoch += 1
                if not isinstance(batch, dict):
                    raise TypeError(f"train_loader must yield dict batches, got {type(batch).__name__}")
                return batch
            if self.batch_in_epoch == 0:
                raise ValueError(f"train_loader yielded no batches in epoch {self.epoch}")
            self.epoch, self.batch_in_epoch, self._batches = self.epoch + 1, 0, None

    # One optimizer step --------------------------------------------------------------------------------

    def _train_step(self, windows: tuple[Window, ...], logger: RunLogger) -> bool:
        """One optimizer step (skipped when not finite), added to `windows`; returns whether a rank asked to stop."""
        accumulated = self._accumulate()
        loss, grad_norm, stop, failures = self._agree(accumulated.loss, self._clipped_grad_norm(),
                                                      accumulated.matching_failures)
        if failures > 0 and math.isfinite(loss):
            raise ValueError(
                f"the Hungarian matcher refused {failures:g} matching problem(s) (an image's cost matrix per decoder "
                f"layer) at step {self.step + 1} although the loss is finite: their costs are infeasible or not "
                "finite (bad target boxes or labels). Run the criterion with validate=True (eager) to have it "
                "name the image and the layer")
        lrs = self._learning_rates()
        finite = self._apply_or_skip(loss, grad_norm, logger)
        self._advance()
        self._add_to_windows(windows, accumulated, loss=loss, grad_norm=grad_norm, finite=finite)
        logger.step(loss, next(iter(lrs.values())))
        self._last_lrs = lrs
        return stop

    def _accumulate(self) -> _Accumulated:
        """Forward and backward of `grad_accum_steps` micro-batches; gradients are reduced on the last one only."""
        accum = self.config.grad_accum_steps
        accumulated = _Accumulated(loss=torch.zeros((), device=self.device),
                                   matching_failures=torch.zeros((), device=self.device))
        for micro in range(accum):
            batch = self._next_batch()
            accumulated.count(batch)
            output, loss = self._forward_backward(self._model_inputs(batch), sync=micro == accum - 1)
            accumulated.add(output, loss, accum)
        return accumulated

    def _model_inputs(self, batch: dict) -> dict:
        """The batch entries the model's forward takes, on the device."""
        inputs = {k: v for k, v in batch.items() if self.forward_keys is None or k in self.forward_keys}
        return batch_to_device(inputs, self.device)

    def _forward_backward(self, inputs: dict, *, sync: bool) -> tuple[object, torch.Tensor]:
        """Forward under autocast, backward of the (scaled) loss share; returns the output and the share, detached."""
        if self.config.cuda_graphs:  # the previous replay's outputs are consumed: their memory may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with dist_utils.gradient_sync(self.model, enabled=sync):
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                output = self.step_model(**inputs)
            loss = output.loss.float() / self.config.grad_accum_steps
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        return output, loss.detach()

    def _clipped_grad_norm(self) -> torch.Tensor:
        """Unscales fp16 gradients and clips them to `max_grad_norm` (when set); returns their norm before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm or math.inf)

    def _agree(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor, matching_failures: torch.Tensor
               ) -> tuple[float, float, bool, float]:
        """The step's loss (the mean over ranks), its gradient norm, whether any rank asked to stop and the
        refused matching problems (summed over ranks)."""
        stop_flag = torch.tensor(float(self._stop_requested), device=self.device)
        # One reduction decides for every rank: a NaN on any rank makes the mean NaN, so all skip together.
        agreed = dist_utils.all_reduce_mean(torch.stack([loss_sum, stop_flag, matching_failures]))
        # The step's one read from the device, after its backward and clipping: nothing waits mid-step.
        grad_norm = dist_utils.to_local(grad_norm).detach().float().reshape(1)
        loss, stop, failures, grad_norm = torch.cat([agreed, grad_norm.to(agreed.device)]).tolist()
        return loss, grad_norm, stop > 0, failures * dist_utils.world_size()

    def _learning_rates(self) -> dict[str, float]:
        """Each parameter group's learning rate, by group name (else index)."""
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}

    def _apply_or_skip(self, loss: float, grad_norm: float, logger: RunLogger) -> bool:
        """Applies the step when it is finite, else skips and counts it; returns whether it was applied."""
        # Without a scaler a finite loss can still give non-finite gradients (the scaler skips those itself).
        finite = math.isfinite(loss) and (self.scaler is not None or math.isfinite(grad_norm))
        if finite:
            self._apply()
        else:
            self._skip(loss, grad_norm, logger)
        return finite

    def _apply(self) -> None:
        """Steps the optimizer (through the fp16 scaler, if any) and ends a streak of non-finite steps."""
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.consecutive_nonfinite = 0
        self.recent_nonfinite.clear()

    def _skip(self, loss: float, grad_norm: float, logger: RunLogger) -> None:
        """Leaves the parameters as they are, counts the non-finite step and logs it."""
        if self.scaler is not None:
            self.scaler.update()  # closes the unscale_ above; the scale backs off as for an overflow
        self.skipped_nonfinite += 1
        self.consecutive_nonfinite += 1
        self.recent_nonfinite.append(loss)
        logger.record({"event": "skipped_nonfinite", "step": self.step + 1, "epoch": self.epoch,
                       "loss": loss, "grad_norm": grad_norm})

    def _advance(self) -> None:
        """Clears the gradients, moves the schedule and the step count on; stops a too long non-finite streak."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.consecutive_nonfinite >= self.config.max_nonfinite_steps:
            raise RuntimeError(
                f"{self.consecutive_nonfinite} consecutive non-finite losses up to step {self.step} "
                f"(TrainerConfig.max_nonfinite_steps={self.config.max_nonfinite_steps}); the last losses were "
                f"{list(self.recent_nonfinite)}: lower the learning rate, check the data, or use bf16/fp32")

    def _add_to_windows(self, windows: tuple[Window, ...], accumulated: _Accumulated, *, loss: float,
                        grad_norm: float, finite: bool) -> None:
        """Adds the step to each log window, with the samples and tokens of all ranks."""
        world = dist_utils.world_size()
        for window in windows:
            window.add(loss=loss, task_losses=accumulated.task_losses, grad_norm=grad_norm, finite=finite,
                       samples=accumulated.samples * world, tokens=accumulated.tokens * world)

    # Checkpoints --------------------------------------------------------------------------------------

    def _save(self) -> Path:
        """Writes step_dir(output_dir, step) on rank 0 (every rank takes part in gathering the state)."""
        extra = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "skipped_nonfinite": self.skipped_nonfinite, "consecutive_nonfinite": self.consecutive_nonfinite,
                 "elapsed": self.elapsed,
                 "rank_rng": dist_utils.all_gather_objects(dist_utils.torch_rng_state(self.device)),
                 "scaler": None if self.scaler is None else self.scaler.state_dict(),
                 "config": asdict(self.config), "world_size": dist_utils.world_size()}
        model_state = dist_utils.full_model_state_dict(self.model) if self.sharded else None
        # Keyed by parameter name in every mode, so a run saved by one process or DDP resumes under FSDP too.
        optimizer_state = dist_utils.full_optimizer_state_dict(self.model, self.optimizer)
        directory = step_dir(self.config.output_dir, self.step)
        if self.is_main:
            save_checkpoint(directory, model=self.module, optimizer=self.optimizer, scheduler=self.scheduler,
                            step=self.step, extra=extra, model_state=model_state, optimizer_state=optimizer_state)
            prune_checkpoints(self.config.output_dir, keep_last=self.config.keep_last)
        dist_utils.barrier()
        return directory

    def _resume(self) -> Path | None:
        """Loads the latest complete checkpoint in output_dir, if any, and takes up its position."""
        path = latest_checkpoint(self.config.output_dir)
        if path is None:
            return None
        loaders = {"load_optimizer_state": partial(self._load_optimizer_state, path)}
        if self.sharded:
            loaders["load_model_state"] = partial(dist_utils.load_full_model_state_dict, self.model)
        state = load_checkpoint(path, model=self.module, optimizer=self.optimizer, scheduler=self.scheduler,
                                **loaders)
        extra = state["extra"]
        if "batch_in_epoch" not in extra:
            raise ValueError(f"{path} holds no data position: it was not written by Trainer (move it out of "
                             f"output_dir, or set TrainerConfig.resume=False)")
        self._batches = None
        self.step, self.epoch = state["step"], extra["epoch"]
        self.batch_in_epoch = self._resumed_batch(path, extra)
        self._warn_changed_settings(path, extra.get("config", {}))
        self.skipped_nonfinite = extra["skipped_nonfinite"]
        self.consecutive_nonfinite = extra["consecutive_nonfinite"]
        self.elapsed = extra["elapsed"]
        if self.scaler is not None and extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])
        rank, rank_rng = dist_utils.rank(), extra["rank_rng"]
        if rank < len(rank_rng):
            dist_utils.set_torch_rng_state(rank_rng[rank], self.device)
        else:  # more ranks than the saved run: a fresh stream per rank
            torch.manual_seed(self.config.seed + rank + self.step)
        return path

    def _load_optimizer_state(self, path: Path, state: dict) -> None:
        groups = state.get("param_groups") or [{}]
        if all(isinstance(p, int) for p in groups[0].get("params", [])):  # an index-keyed state (older saves)
            if self.sharded:
                raise ValueError(f"{path} keys its optimizer state by parameter index, which FSDP cannot map: "
                                 f"resume it in one process or under DDP")
            self.optimizer.load_state_dict(state)
        else:
            dist_utils.load_full_optimizer_state_dict(self.model, self.optimizer, state)

    def _resumed_batch(self, path: Path, extra: dict) -> int:
        """This rank's batch position in the resumed epoch. With another number of ranks than the saved run,
        the same share of the epoch is taken as done: each rank's batches are then other samples than the
        uninterrupted run's, so the rest of that epoch may repeat or miss some of them (later epochs do not)."""
        position, saved_world = extra["batch_in_epoch"], extra.get("world_size", len(extra.get("rank_rng", [0])))
        world = dist_utils.world_size()
        if saved_world == world:
            return position
        converted = position * saved_world // world
        if hasattr(self.train_loader, "__len__"):
            converted = min(converted, len(self.train_loader))
        if self.is_main:
            warnings.warn(f"{path} was saved by {saved_world} processes and resumes on {world}: epoch {self.epoch} "
                          f"continues at batch {converted} of each rank (saved: {position}); the samples of the "
                          f"rest of this epoch differ from an uninterrupted run's", stacklevel=3)
        return converted

    def _warn_changed_settings(self, path: Path, saved: dict) -> None:
        """Resuming keeps the checkpoint's optimizer and schedule: say so when the settings asked for differ."""
        ours = asdict(self.config)
        changed = {name: (saved[name], ours[name]) for name in TRAJECTORY_SETTINGS
                   if name in saved and saved[name] != ours[name]}
        if changed and self.is_main:
            listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())
            warnings.warn(f"resuming {path} with other settings than it was trained with ({listed}): the learning "
                          f"rates, weight decay and schedule stay those of the checkpoint's optimizer and scheduler; "
                          f"start a new output_dir to train with new ones", stacklevel=3)

    # The run -----------------------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        # Only a flag: the step in flight finishes, then every rank saves and stops at the same step.
        self._stop_requested = True

    def _log(self, window: Window, logger: RunLogger) -> tuple[float | None, dict[str, float]]:
        """Writes the window's record; returns its mean loss and task losses."""
        loss, task_losses = window.averages()
        if dist_utils.world_size() > 1:  # like the loss, the mean over ranks (one gather per record)
            task_losses = _mean_over_ranks(dist_utils.all_gather_objects(task_losses))
        seconds = max(time.perf_counter() - window.started, 1e-9)
        record = {"step": self.step, "epoch": self.epoch, "lr": self._last_lrs, "loss": loss,
                  "losses": task_losses, "grad_norm": window.grad_norm,
                  "samples_per_s": window.samples / seconds, "tokens_per_s": window.tokens / seconds,
                  "skipped_nonfinite": self.skipped_nonfinite, "elapsed": self.elapsed}
        if not task_losses:  # a one-task model (fine-tuning): its loss is "loss", an empty "losses" says nothing
            del record["losses"]
        logger.record(record)
        return loss, task_losses

    def train(self) -> dict:
        """Trains up to `config.max_steps` (resuming from output_dir unless `config.resume` is False).

        Returns steps, epochs (fractional when the loader has a length), skipped_nonfinite, stopped ("done",
        or "sigterm" after SIGTERM: a checkpoint is written at the step reached), samples_per_s and tokens_per_s
        (this call, all ranks), loss and losses (the last log window's), seconds (this call), checkpoint
        (the last one written or resumed from, as a string; None if none; a SIGTERM stop also logs it as the
        "stopped_by_sigterm" event) and resumed_from ({"checkpoint", "step"}
        of the checkpoint this call resumed, also logged as a "resumed" event; None for a fresh run)."""
        config = self.config
        started = time.perf_counter()
        checkpoint = self._start_run()
        logger = RunLogger(config.output_dir, enabled=self.is_main, total_steps=config.max_steps,
                           initial_step=self.step, progress=config.progress, tensorboard=config.tensorboard)
        run = _Run(started, checkpoint)
        if checkpoint is not None:
            run.resumed_from = {"checkpoint": str(checkpoint), "step": self.step}
            # One line on the console and in log.jsonl: a rerun that continues an old run says so.
            logger.record({"event": "resumed", "step": self.step, "epoch": self.epoch,
                           "resumed_from": run.resumed_from})
        try:
            with self._sigterm_requests_stop():
                self._run_steps(run, logger)
        finally:
            logger.close()
        return self._summary(run)

    def _start_run(self) -> Path | None:
        """Resumes from output_dir's latest checkpoint, else seeds a fresh run; returns the checkpoint (or None)."""
        if self.config.resume:
            checkpoint = self._resume()
        else:
            self._refuse_existing_checkpoints()
            checkpoint = None
        if checkpoint is None:
            self._seed()
        return checkpoint

    def _refuse_existing_checkpoints(self) -> None:
        """A new run in a folder of checkpoints would prune, log and resume from them as if they were its own."""
        existing = latest_checkpoint(self.config.output_dir)
        if existing is not None:
            raise ValueError(f"TrainerConfig.resume is False but {self.config.output_dir} already holds checkpoints "
                             f"({existing.name}): choose a new output_dir, delete them, or resume")

    def _seed(self) -> None:
        """Seeds Python, NumPy and torch with `config.seed` plus the rank."""
        seed = self.config.seed + dist_utils.rank()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    @contextlib.contextmanager
    def _sigterm_requests_stop(self):
        """Within it, SIGTERM asks the run to stop after the step in flight (in the main thread only)."""
        # Signal handlers can only be installed from the main thread; elsewhere SIGTERM keeps its meaning.
        handles_sigterm = threading.current_thread() is threading.main_thread()
        if handles_sigterm:
            previous_handler = signal.signal(signal.SIGTERM, self._request_stop)
        try:
            yield
        finally:
            if handles_sigterm:
                # None: a handler installed outside Python, which cannot be put back; the default is closest.
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_handler is None else previous_handler)
            self._stop_requested = False

    def _run_steps(self, run: _Run, logger: RunLogger) -> None:
        """Optimizer steps up to `max_steps`, or fewer when a rank asks to stop."""
        elapsed_before = self.elapsed
        while self.step < self.config.max_steps:
            stop_requested = self._train_step((run.window, run.totals), logger)
            self.elapsed = elapsed_before + time.perf_counter() - run.started
            done = self.step == self.config.max_steps
            if stop_requested and not done:
                run.stopped = "sigterm"
            self._log_and_save_when_due(run, logger, final=done or run.stopped == "sigterm")
            if run.stopped == "sigterm":
                # The last line of log.jsonl: what tells a preemption (resume it) from a crash under torchrun,
                # which reports the workers' exit status 143 as a failure (its own status is 1).
                logger.record({"event": "stopped_by_sigterm", "step": self.step, "epoch": self.epoch,
                               "checkpoint": str(run.checkpoint)})
                break

    def _log_and_save_when_due(self, run: _Run, logger: RunLogger, *, final: bool) -> None:
        """Writes a log record every `log_every` steps and a checkpoint every `save_every`, both at the last step."""
        if final or self.step % self.config.log_every == 0:
            run.loss, run.task_losses = self._log(run.window, logger)
            run.window = Window()
        if final or (self.config.save_every and self.step % self.config.save_every == 0):
            run.checkpoint = self._save()

    def _summary(self, run: _Run) -> dict:
        """What `train` returns (see there)."""
        seconds = time.perf_counter() - run.started
        batches_per_epoch = len(self.train_loader) if hasattr(self.train_loader, "__len__") else 0
        epochs = self.epoch + self.batch_in_epoch / batches_per_epoch if batches_per_epoch else self.epoch
        return {"steps": self.step, "epochs": epochs, "skipped_nonfinite": self.skipped_nonfinite,
                "stopped": run.stopped, "samples_per_s": run.totals.samples / seconds,
                "tokens_per_s": run.totals.tokens / seconds, "loss": run.loss, "losses": run.task_losses,
                "seconds": seconds, "checkpoint": None if run.checkpoint is None else str(run.checkpoint),
                "resumed_from": run.resumed_from}
