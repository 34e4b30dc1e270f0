"""scipy's own test module for linear_sum_assignment, run against e2evlp's CPU solver through an adapter."""

import types
from collections.abc import Collection

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


def _listed_parametrize(mark: pytest.Mark) -> pytest.Mark:
    """The mark with a one-shot iterable of parameter values (scipy passes an itertools.product) as a list, which
    pytest can read more than once and no longer warns about."""
    args, kwargs = list(mark.args), dict(mark.kwargs)
    if mark.name == "parametrize" and "argvalues" in kwargs and not isinstance(kwargs["argvalues"], Collection):
        kwargs["argvalues"] = list(kwargs["argvalues"])
    elif mark.name == "parametrize" and len(args) > 1 and not isinstance(args[1], Collection):
        args[1] = list(args[1])
    else:
        return mark
    return pytest.mark.parametrize(*args, **kwargs).mark


def _reexported(test):
    """A copy of scipy's test function with its parametrize values listed, so that scipy's function object is not
    changed. It keeps scipy_suite's globals, which the fixture patches."""
    copy = types.FunctionType(test.__code__, test.__globals__, test.__name__, test.__defaults__, test.__closure__)
    copy.__dict__.update(test.__dict__)
    copy.__kwdefaults__, copy.__qualname__, copy.__module__ = test.__kwdefaults__, test.__qualname__, test.__module__
    if "pytestmark" in test.__dict__:
        copy.pytestmark = [_listed_parametrize(mark) for mark in test.pytestmark]
    return copy


# Re-export scipy's test functions.
for _name in dir(scipy_suite):
    if _name.startswith("test_"):
        globals()[_name] = _reexported(getattr(scipy_suite, _name))


def test_adapter_is_really_in_use():
    assert scipy_suite.linear_sum_assignment is scipy_signature_adapter
