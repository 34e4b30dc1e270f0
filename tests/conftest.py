"""Shared pytest setup: the `cuda` marker skips cleanly without a GPU; without one, Triton interprets."""

import os

import torch

if not torch.cuda.is_available():
    # Before anything imports triton: the attention kernels then run in Triton's CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (cuda marker)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
