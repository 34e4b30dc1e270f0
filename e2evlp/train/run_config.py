"""Run configs: a YAML file of model / data / train sections, overridden by ``section.key=value`` arguments."""

from __future__ import annotations

import copy
import re
from dataclasses import fields
from pathlib import Path

import yaml

SECTIONS = ("model", "tokenizer", "data", "train", "eval")
MODEL_KEYS = ("preset", "init", "bert", "config")
PRESETS = ("tiny", "small", "base")
IMAGE_KEYS = ("train_min", "train_max", "train_step", "max_longer", "eval")
DATA_KEYS = ("train", "val", "test", "karpathy", "images", "train_split", "val_split", "test_split", "merge_restval",
             "answers", "image", "batch_size", "eval_batch_size", "num_workers", "skip_bad", "cache_images")
EVAL_KEYS = ("num_beams",)
TINY_IMAGES = {"train_min": 64, "train_max": 96, "train_step": 16, "max_longer": 128, "eval": 80}
DETR_IMAGES = {"train_min": 480, "train_max": 800, "train_step": 32, "max_longer": 1333, "eval": 800}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` as a string (it wants ``3.0e-4``); this loader reads it as the float users mean."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$|^[-+]?(?:\d+\.\d*|\.\d+)$|^[-+]?\.(?:inf|Inf|INF)$"
               r"|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def read_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class RunConfigError(ValueError):
    """A run config names an unknown section or key, or holds a value of the wrong kind."""


def parse_override(text: str) -> tuple[list[str], object]:
    """``"train.lr=3e-4"`` → (["train", "lr"], 3e-4); the value is read as YAML, so numbers, booleans,
    null and lists keep their type."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RunConfigError(f"override {text!r} is not of the form section.key=value")
    return key.split("."), read_yaml(value) if value else ""


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """A copy of `config` with each ``a.b.c=value`` set (intermediate mappings are created)."""
    config = copy.deepcopy(config)
    for text in overrides:
        keys, value = parse_override(text)
        node = config
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise RunConfigError(f"override {text!r}: {'.'.join(keys[:depth + 1])} is not a mapping")
            node = child
        node[keys[-1]] = value
    return config


def _check_keys(section: str, values: dict, allowed) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise RunConfigError(f"unknown key(s) {unknown} in section {section!r}; allowed: {sorted(allowed)}")


def validate(config: dict) -> dict:
    """Checks names, fills defaults, and returns the config; train keys must be TrainerConfig fields."""
    from e2evlp.train.trainer import TrainerConfig

    if not isinstance(config, dict):
        raise RunConfigError(f"a run config is a mapping of sections, got {type(config).__name__}")
    _check_keys("top level", config, SECTIONS)
    model = config.setdefault("model", {})
    _check_keys("model", model, MODEL_KEYS)
    model.setdefault("preset", "base")
    if model["preset"] not in PRESETS:
        raise RunConfigError(f"model.preset must be one of {PRESETS}, got {model['preset']!r}")
    model.setdefault("config", {})
    data = config.setdefault("data", {})
    _check_keys("data", data, DATA_KEYS)
    image = {**(TINY_IMAGES if model["preset"] == "tiny" else DETR_IMAGES), **(data.get("image") or {})}
    _check_keys("data.image", image, IMAGE_KEYS)
    data["image"] = image
    data.setdefault("batch_size", 32)
    data.setdefault("num_workers", 4)
    train = config.setdefault("train", {})
    _check_keys("train", train, [f.name for f in fields(TrainerConfig)])
    if config.get("eval") is None:  # absent, or an empty "eval:" line
        config["eval"] = {}
    evaluation = config["eval"]
    if not isinstance(evaluation, dict):
        raise RunConfigError(f"section 'eval' is a mapping, got {evaluation!r}")
    _check_keys("eval", evaluation, EVAL_KEYS)
    return config


def schema() -> dict[str, tuple[str, ...]]:
    """Each section's keys that `validate` accepts (``data.image`` as its own entry; ``tokenizer`` is a path)."""
    from e2evlp.train.trainer import TrainerConfig

    return {"model": MODEL_KEYS, "tokenizer": (), "data": DATA_KEYS, "data.image": IMAGE_KEYS,
            "train": tuple(f.name for f in fields(TrainerConfig)), "eval": EVAL_KEYS}


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """Reads the YAML file (or starts empty when `path` is None), applies `overrides`, validates."""
    config = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"run config {path} does not exist")
        config = read_yaml(path.read_text()) or {}
    return validate(apply_overrides(config, list(overrides)))
