"""Plain PyTorch + scipy twins of every fast op, used by tests, benchmarks and kernels="reference"."""

from e2evlp.reference.assignment import linear_sum_assignment
from e2evlp.reference.attention import attention, attention_varlen
from e2evlp.reference.boxes import box_losses, cost_block, matching_cost
from e2evlp.reference.matcher import HungarianMatcher, SetCriterion

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
