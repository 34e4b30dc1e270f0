"""Helpers for linear-assignment tests: scipy's optimal total and a validity check of an assignment."""

import numpy as np
import scipy.optimize


def scipy_total(cost: np.ndarray, maximize: bool = False) -> float:
    """scipy's optimal total on a float64 matrix."""
    rows, cols = scipy.optimize.linear_sum_assignment(cost, maximize=maximize)
    return float(cost[rows, cols].sum())


def assignment_total(cost: np.ndarray, assignment) -> float:
    """Checks that `assignment` [N] is a valid full matching of `cost` [N, M] and returns its total."""
    assignment = np.asarray(assignment)
    n, m = cost.shape
    assert assignment.shape == (n,)
    rows = np.flatnonzero(assignment >= 0)
    cols = assignment[rows]
    assert len(rows) == min(n, m), f"{len(rows)} rows assigned, expected {min(n, m)}"
    assert cols.max(initial=-1) < m and len(np.unique(cols)) == len(cols), "a column is used twice"
    assert (assignment[assignment < 0] == -1).all()
    return float(cost[rows, cols].sum())
