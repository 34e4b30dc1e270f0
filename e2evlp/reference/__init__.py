"""Plain PyTorch + scipy twins of every fast op, used by tests, benchmarks and kernels="reference"."""

import importlib

from e2evlp.reference.attention import attention, attention_varlen
from e2evlp.reference.boxes import box_losses, cost_block, matching_cost

# The scipy-backed twins load on first use: e2evlp.ops imports this package for its reference attention
# backend, and importing e2evlp.ops must not import scipy.
_SCIPY_TWINS = {"linear_sum_assignment": "e2evlp.reference.assignment", "HungarianMatcher": "e2evlp.reference.matcher",
                "SetCriterion": "e2evlp.reference.matcher"}

__all__ = [
    "HungarianMatcher",
    "SetCriterion",
    "attention",
    "attention_varlen",
    "box_losses",
    "cost_block",
    "linear_sum_assignment",
    "matching_cost",
]


def __getattr__(name: str):
    if name not in _SCIPY_TWINS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_SCIPY_TWINS[name]), name)
    globals()[name] = value
    return value
