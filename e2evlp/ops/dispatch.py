"""Which implementation an op runs on a device: CUDA → Triton, CPU → SDPA, or the Triton interpreter."""

from __future__ import annotations

import os

import torch

ATTENTION_BACKENDS = ("triton", "sdpa", "reference")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def attention_backend(device: torch.device | str) -> str:
    """The attention backend for tensors on `device`; E2EVLP_ATTENTION=triton|sdpa|reference overrides."""
    override = os.environ.get("E2EVLP_ATTENTION")
    if override:
        if override not in ATTENTION_BACKENDS:
            raise ValueError(f"E2EVLP_ATTENTION must be one of {ATTENTION_BACKENDS}, got {override!r}")
        return override
    if torch.device(device).type == "cuda" or triton_interpreting():
        return "triton"
    return "sdpa"
