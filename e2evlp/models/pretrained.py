"""save_pretrained / from_pretrained for every e2evlp model: config.json + model.safetensors, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from e2evlp.io import atomic_write, without_tied_aliases
from e2evlp.models.config import E2EVLPConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def read_config(directory: str | os.PathLike, **overrides) -> E2EVLPConfig:
    """The E2EVLPConfig saved in `directory`; a checkpoint of another model type is refused."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a save_pretrained directory")
    fields = json.loads(path.read_text())
    if fields.get("model_type") != E2EVLPConfig.model_type:
        raise ValueError(f"{directory} holds a {fields.get('model_type')!r} checkpoint, expected "
                         f"model_type {E2EVLPConfig.model_type!r}")
    fields.update(overrides)
    return E2EVLPConfig.from_dict(fields)


class PretrainedModule(nn.Module):
    """Adds save_pretrained / from_pretrained; subclasses take an E2EVLPConfig as their first argument."""

    config: E2EVLPConfig
    # State computed from the config (e.g. the criterion's eos_coef class weights): saved under its usual key,
    # but from_pretrained keeps the value built from the config, so an override such as eos_coef takes effect.
    config_buffers: tuple[str, ...] = ()

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Writes config.json and model.safetensors; `state_dict` replaces ``self.state_dict()`` where the
        caller gathered it (an FSDP-sharded model's full state)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
        tensors = without_tied_aliases(self.state_dict() if state_dict is None else state_dict)
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(tensors, tmp))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **config_overrides):
        """Builds the model from `directory`'s config (with `config_overrides`) and loads its weights, except
        ``config_buffers``. A task model loads from a pre-training checkpoint: weights the task does not use
        are skipped; missing ones are an error, except the task's own new heads, which keep their
        initialization (listed in `.new_weights`)."""
        # The saved weights include the backbone's: re-reading the original ImageNet file would be wasted work,
        # and an error on a machine without it.
        model = cls(read_config(directory, **{"backbone_weights": None, **config_overrides}))
        own = model.state_dict()
        saved = cls._loadable_weights(read_weights(directory), own)
        new_weights = cls._new_weights(own, saved, directory)
        model.load_state_dict({k: v for k, v in saved.items() if k in own}, strict=False)
        model.new_weights = new_weights
        return model

    @classmethod
    def _loadable_weights(cls, saved: dict, own: dict) -> dict:
        """`saved` under this model's keys, without ``config_buffers``."""
        # A task model's checkpoint loaded into the bare trunk (E2EVLPModel) holds it under "model.".
        if not any(k in saved for k in own) and any(k.startswith("model.") for k in saved):
            saved = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
        return {k: v for k, v in saved.items() if k not in cls.config_buffers}

    @classmethod
    def _new_weights(cls, own: dict, saved: dict, directory: str | os.PathLike) -> list[str]:
        """The weights of `own` that `saved` lacks, all in the task's new heads (``task_heads``), else a ValueError."""
        tied = _tied_to(own, saved)
        missing = [k for k in own if k not in saved and k not in cls.config_buffers and k not in tied]
        new_heads = tuple(getattr(cls, "task_heads", ()))
        lacking = [k for k in missing if not (new_heads and k.startswith(new_heads))]
        if lacking:
            raise ValueError(f"{Path(directory) / WEIGHTS_NAME} lacks weights this {cls.__name__} needs: "
                             f"{lacking[:8]}" + (" ..." if len(lacking) > 8 else ""))
        return missing


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors saved in `directory`'s model.safetensors."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    return safetensors.torch.load_file(path)


def _tied_to(own: dict, saved: dict) -> set[str]:
    """Keys of `own` that share their tensor with another key that `saved` provides."""
    by_pointer: dict[int, list[str]] = {}
    for key, value in own.items():
        if value.numel():
            by_pointer.setdefault(value.data_ptr(), []).append(key)
    tied = set()
    for keys in by_pointer.values():
        if len(keys) > 1 and any(k in saved for k in keys):
            tied.update(keys)
    return tied
