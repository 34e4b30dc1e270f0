"""Plain PyTorch + scipy twins of every fast op, used by tests, benchmarks and kernels="reference"."""

from e2evlp.reference.assignment import linear_sum_assignment

__all__ = ["linear_sum_assignment"]
