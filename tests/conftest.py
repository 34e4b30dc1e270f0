"""Shared pytest setup: the `cuda` marker skips cleanly without a GPU; without one, Triton interprets."""

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_pypi_kernels() -> None:
    """transformers 5 imports PyPI's `kernels` package (its dependency) when building models; with the repository
    root on sys.path, as under pytest, our kernels/ folder (installed as e2evlp.kernels) would shadow it."""
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: then nothing imports it either
        pass
    finally:
        sys.path[:] = saved


if not torch.cuda.is_available():
    # Before anything imports triton: the attention kernels then run in Triton's CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
_import_pypi_kernels()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (cuda marker)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
