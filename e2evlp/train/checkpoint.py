"""Training checkpoints: weights, optimizer, scheduler and RNG states, published atomically and resumable."""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from e2evlp.io import atomic_write, without_tied_aliases

WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "training_state.pt"
STEP_DIR = re.compile(r"step-(\d+)")
STAGING_DIR = re.compile(r"step-\d+\.tmp-\d+")  # what a save killed mid-write leaves behind


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The directory `latest_checkpoint` looks for: run_dir/step-<step as 8 digits>, e.g. step-00001200."""
    return Path(run_dir) / f"step-{step:08d}"


def _rng_state() -> dict:
    """Every generator a training step may draw from, as tensors, lists and ints (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        # A resume on fewer GPUs restores the devices it has.
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def _publish(staging: Path, directory: Path) -> None:
    """Renames `staging` over `directory`; the old checkpoint is moved aside first, and back if that fails."""
    old = directory.with_name(f"{directory.name}.old")
    if old.exists():
        # Left by a save killed between the renames below (then it is the only copy) or before deleting it.
        if directory.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, directory)
    if directory.exists():
        os.replace(directory, old)  # a directory cannot be renamed over a non-empty one
    try:
        os.replace(staging, directory)
    except BaseException:
        if old.exists():
            os.replace(old, directory)
        raise
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(directory: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, step: int, extra: dict | None = None, model_state: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Writes model weights and training state into `directory`, all or nothing.

    Everything goes to `directory.tmp-<pid>` first, which then replaces `directory` by rename, so a kill
    never leaves a partial checkpoint there. `extra` must hold only what ``torch.load(weights_only=True)``
    reads back: tensors, numbers, strings and containers of them. `model_state` / `optimizer_state` replace
    ``model.state_dict()`` / ``optimizer.state_dict()`` where the caller gathered them (a sharded model)."""
    directory = Path(directory)
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(staging, state_dict=model_state)
        else:
            tensors = without_tied_aliases(model.state_dict() if model_state is None else model_state,
                                           prefer_prefix="")
            atomic_write(staging / WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(tensors, tmp))
        if optimizer_state is None and optimizer is not None:
            optimizer_state = optimizer.state_dict()
        state = {"step": step, "extra": extra or {}, "rng": _rng_state(), "optimizer": optimizer_state,
                 "scheduler": None if scheduler is None else scheduler.state_dict()}
        atomic_write(staging / STATE_NAME, lambda tmp: torch.save(state, tmp))
        _publish(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


def _load_weights(path: Path, model: nn.Module) -> None:
    """Loads `path` into `model`, refusing a checkpoint whose names differ (tied aliases may be absent)."""
    saved = safetensors.torch.load_file(path)
    own = model.state_dict()
    present = {own[k].data_ptr() for k in saved if k in own and own[k].numel()}
    missing = [k for k in own if k not in saved and not (own[k].numel() and own[k].data_ptr() in present)]
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path} does not match {type(model).__name__}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    model.load_state_dict(saved, strict=False)


def load_checkpoint(directory: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, restore_rng: bool = True,
                    load_model_state: Callable[[dict], None] | None = None,
                    load_optimizer_state: Callable[[dict], None] | None = None) -> dict:
    """Restores what `save_checkpoint` wrote into the given objects; returns ``{"step", "extra"}``.

    `load_model_state` / `load_optimizer_state`, when given, receive the saved state dicts instead of
    ``model`` / ``optimizer`` (a sharded model loads the full state its own way)."""
    directory = Path(directory)
    for name in (WEIGHTS_NAME, STATE_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no {name} in {directory}: not a complete checkpoint")
    if load_model_state is None:
        _load_weights(directory / WEIGHTS_NAME, model)
    else:
        load_model_state(safetensors.torch.load_file(directory / WEIGHTS_NAME))
    # map_location: the optimizer moves its state to its parameters' device itself.
    state = torch.load(directory / STATE_NAME, map_location="cpu", weights_only=True)
    if optimizer is not None and load_optimizer_state is None:
        load_optimizer_state = optimizer.load_state_dict
    for name, load in (("optimizer", load_optimizer_state),
                       ("scheduler", None if scheduler is None else scheduler.load_state_dict)):
        if load is not None:
            if state[name] is None:
                raise ValueError(f"{directory} was saved without a {name} state")
            load(state[name])
    if restore_rng:
        _set_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete `step-<8 digits>` directory under `run_dir` with the highest step, or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    complete = [(int(match[1]), path) for path in run_dir.iterdir()
                if (match := STEP_DIR.fullmatch(path.name))
                and (path / WEIGHTS_NAME).is_file() and (path / STATE_NAME).is_file()]
    return max(complete)[1] if complete else None


def prune_checkpoints(run_dir: str | os.PathLike, *, keep_last: int) -> None:
    """Deletes the `step-*` directories under `run_dir` beyond the newest `keep_last` (0 keeps them all), and
    the staging directories of saves that were killed (call it when no save is in flight)."""
    entries = list(Path(run_dir).iterdir())
    steps = sorted((int(match[1]), path) for path in entries if (match := STEP_DIR.fullmatch(path.name)))
    doomed = [path for _, path in steps[:-keep_last]] if keep_last else []
    doomed += [path for path in entries if STAGING_DIR.fullmatch(path.name)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
