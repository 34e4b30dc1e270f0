"""Which implementation an op runs on a device: CUDA → Triton, CPU → SDPA, or the Triton interpreter."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from e2evlp.devices import triton_interpreting

ATTENTION_BACKENDS = ("triton", "sdpa", "reference")
# The innermost attention_backend_override last. A plain module-level list, not a ContextVar: torch.compile
# guards on it, while Dynamo in torch 2.11 cannot trace ContextVar.get (fullgraph compilation fails).
_OVERRIDES: list[str | None] = []


@functools.cache
def check_interpreter() -> None:
    """Triton before 3.7 turns a kernel's loop bound into a Python int with int() on a 1-element array,
    which NumPy 2.4 refuses: every kernel with a runtime loop then fails inside the interpreter."""
    import numpy
    import triton

    def version(text):
        return tuple(int(part) for part in text.split("+")[0].split(".")[:2])

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        raise RuntimeError(f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run the attention "
                           f"kernels with NumPy {numpy.__version__}: install 'numpy<2.4' or Triton 3.7 or later")


@contextlib.contextmanager
def attention_backend_override(name: str | None):
    """Within the block, every attention call runs `name` (e.g. a model built with kernels="reference")."""
    if name is not None and name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    _OVERRIDES.append(name)
    try:
        yield
    finally:
        _OVERRIDES.pop()


def attention_backend(device: torch.device | str) -> str:
    """The attention backend for tensors on `device`: attention_backend_override, else
    E2EVLP_ATTENTION=triton|sdpa|reference, else CUDA → triton, CPU → sdpa (triton when interpreting)."""
    if _OVERRIDES and _OVERRIDES[-1] is not None:
        return _OVERRIDES[-1]
    override = os.environ.get("E2EVLP_ATTENTION")
    if override:
        if override not in ATTENTION_BACKENDS:
            raise ValueError(f"E2EVLP_ATTENTION must be one of {ATTENTION_BACKENDS}, got {override!r}")
        return override
    if torch.device(device).type == "cuda":
        return "triton"
    if triton_interpreting():
        if not torch.compiler.is_compiling():
            check_interpreter()
        return "triton"
    return "sdpa"
