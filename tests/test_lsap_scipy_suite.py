"""scipy's own test module for linear_sum_assignment, run against e2evlp's CPU solver through an adapter."""

import numpy as np
import pytest
import torch

scipy_suite = pytest.importorskip("scipy.optimize.tests.test_linear_assignment")

from e2evlp import ops


def scipy_signature_adapter(cost_matrix, maximize=False):
    """scipy's call signature and return value on top of e2evlp.ops.linear_sum_assignment."""
    array = np.asarray(cost_matrix)
    if array.ndim != 2:
        raise ValueError(f"expected a matrix (2-D array), got a {array.ndim}-D array")
    cost = torch.from_numpy(np.ascontiguousarray(array.astype(np.float64, casting="safe")))
    assignment = ops.linear_sum_assignment(cost, maximize=maximize).numpy()
    rows = np.flatnonzero(assignment >= 0)
    return rows, assignment[rows]


@pytest.fixture(autouse=True)
def _solve_with_e2evlp(monkeypatch):
    monkeypatch.setattr(scipy_suite, "linear_sum_assignment", scipy_signature_adapter)


# Re-export scipy's test functions: their globals are scipy_suite's, which the fixture patches.
for _name in dir(scipy_suite):
    if _name.startswith("test_"):
        globals()[_name] = getattr(scipy_suite, _name)


def test_adapter_is_really_in_use():
    assert scipy_suite.linear_sum_assignment is scipy_signature_adapter
