"""Functional API of e2evlp's fast ops (compiled extension and Triton kernels), dispatched by device."""

from e2evlp.ops.assignment import assignment_to_indices, linear_sum_assignment
from e2evlp.ops.dispatch import attention_backend

__all__ = ["assignment_to_indices", "attention_backend", "linear_sum_assignment"]
