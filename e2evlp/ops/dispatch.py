"""Which implementation an op runs on a device: CUDA → Triton, CPU → SDPA, or the Triton interpreter."""

from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar

import torch

ATTENTION_BACKENDS = ("triton", "sdpa", "reference")
_OVERRIDE: ContextVar[str | None] = ContextVar("e2evlp_attention_backend", default=None)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def attention_backend_override(name: str | None):
    """Within the block, every attention call runs `name` (e.g. a model built with kernels="reference")."""
    if name is not None and name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    token = _OVERRIDE.set(name)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def attention_backend(device: torch.device | str) -> str:
    """The attention backend for tensors on `device`: attention_backend_override, else
    E2EVLP_ATTENTION=triton|sdpa|reference, else CUDA → triton, CPU → sdpa (triton when interpreting)."""
    if _OVERRIDE.get() is not None:
        return _OVERRIDE.get()
    override = os.environ.get("E2EVLP_ATTENTION")
    if override:
        if override not in ATTENTION_BACKENDS:
            raise ValueError(f"E2EVLP_ATTENTION must be one of {ATTENTION_BACKENDS}, got {override!r}")
        return override
    if torch.device(device).type == "cuda" or triton_interpreting():
        return "triton"
    return "sdpa"
