"""e2evlp.ops.linear_sum_assignment (CPU kernel) against scipy, its reference twin, and bad inputs."""

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from e2evlp import ops, reference
from tests.lsap_helpers import assignment_total, scipy_total

SHAPES = [(1, 1), (1, 17), (17, 1), (17, 97), (97, 17), (100, 50), (50, 100), (64, 64)]


def check_against_scipy(cost: torch.Tensor, result: torch.Tensor, maximize: bool = False):
    exact = cost.to(torch.float64).cpu().numpy()
    total = assignment_total(exact, result.cpu().numpy())
    assert total == pytest.approx(scipy_total(exact, maximize), rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_matches_scipy(shape, dtype):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    cost = torch.rand(shape, generator=gen, dtype=dtype)
    check_against_scipy(cost, ops.linear_sum_assignment(cost))


@pytest.mark.parametrize("shape", SHAPES)
def test_integer_ties_match_scipy(shape):
    gen = torch.Generator().manual_seed(7)
    cost = torch.randint(0, 3, shape, generator=gen).double()
    check_against_scipy(cost, ops.linear_sum_assignment(cost))


@pytest.mark.parametrize("shape", [(8, 8), (5, 9), (9, 5)])
def test_constant_matrix_gives_scipy_indices(shape):
    cost = torch.full(shape, 3.0)
    result = ops.linear_sum_assignment(cost).numpy()
    rows, cols = scipy.optimize.linear_sum_assignment(cost.numpy())
    expected = np.full(shape[0], -1)
    expected[rows] = cols
    np.testing.assert_array_equal(result, expected)


def test_duplicated_columns():
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(20, 6, generator=gen, dtype=torch.float64)
    cost = base.repeat(1, 4)[:, torch.randperm(24, generator=gen)]
    check_against_scipy(cost, ops.linear_sum_assignment(cost))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_optimal_for_the_given_matrix(dtype):
    gen = torch.Generator().manual_seed(11)
    cost = (torch.randn(3, 30, 20, generator=gen) * 10).to(dtype)
    result = ops.linear_sum_assignment(cost)
    for b in range(3):
        check_against_scipy(cost[b], result[b])


def test_batch_equals_items_and_reference():
    gen = torch.Generator().manual_seed(5)
    cost = torch.randn(33, 23, 11, generator=gen, dtype=torch.float64)
    batched = ops.linear_sum_assignment(cost)
    for b in range(cost.shape[0]):
        assert torch.equal(batched[b], ops.linear_sum_assignment(cost[b]))
        check_against_scipy(cost[b], batched[b])
    ref = reference.linear_sum_assignment(cost)
    totals = cost.gather(2, batched.clamp(min=0).unsqueeze(-1)).squeeze(-1).sum(1)
    ref_totals = cost.gather(2, ref.clamp(min=0).unsqueeze(-1)).squeeze(-1).sum(1)
    torch.testing.assert_close(totals, ref_totals, rtol=1e-12, atol=1e-12)


def test_maximize_matches_scipy():
    gen = torch.Generator().manual_seed(9)
    cost = torch.rand(4, 13, 29, generator=gen, dtype=torch.float64)
    result = ops.linear_sum_assignment(cost, maximize=True)
    for b in range(4):
        check_against_scipy(cost[b], result[b], maximize=True)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(2)
    storage = torch.rand(6, 40, 60, generator=gen, dtype=torch.float64)
    for cost in (storage.transpose(1, 2), storage[::2, ::3, 1::2], storage.permute(2, 0, 1)[:, :, :7]):
        assert not cost.is_contiguous()
        result = ops.linear_sum_assignment(cost)
        assert torch.equal(result, ops.linear_sum_assignment(cost.contiguous()))
        for b in range(cost.shape[0]):
            check_against_scipy(cost[b], result[b])


def test_padding_is_ignored_whatever_it_holds():
    gen = torch.Generator().manual_seed(4)
    B, N, M = 6, 12, 9
    cost = torch.rand(B, N, M, generator=gen, dtype=torch.float64)
    num_rows = torch.tensor([12, 5, 0, 3, 12, 7])
    num_cols = torch.tensor([9, 9, 4, 0, 2, 8])
    poisoned = cost.clone()
    for b in range(B):
        poisoned[b, num_rows[b]:, :] = float("nan")
        poisoned[b, :, num_cols[b]:] = -float("inf")
    result = ops.linear_sum_assignment(poisoned, num_rows=num_rows, num_cols=num_cols)
    for b in range(B):
        n, m = int(num_rows[b]), int(num_cols[b])
        assert (result[b, n:] == -1).all()
        sub = result[b, :n]
        expected = ops.linear_sum_assignment(cost[b, :n, :m])
        assert torch.equal(sub, expected)
        check_against_scipy(cost[b, :n, :m], sub)
    ref = reference.linear_sum_assignment(poisoned, num_rows=num_rows, num_cols=num_cols)
    assert torch.equal(ref >= 0, result >= 0)


@pytest.mark.parametrize("shape", [(0, 3, 4), (3, 0, 4), (3, 4, 0), (0, 0, 0)])
def test_empty_problems(shape):
    result = ops.linear_sum_assignment(torch.rand(shape))
    assert result.shape == shape[:2] and result.dtype == torch.int64
    assert (result == -1).all()


def test_single_empty_matrix():
    assert ops.linear_sum_assignment(torch.empty(0, 5)).shape == (0,)
    assert (ops.linear_sum_assignment(torch.empty(4, 0)) == -1).all()


def test_feasible_infinities_match_scipy():
    cost = torch.tensor([[1.0, float("inf"), 3.0], [float("inf"), 2.0, float("inf")], [4.0, 5.0, float("inf")]],
                        dtype=torch.float64)
    check_against_scipy(cost, ops.linear_sum_assignment(cost))


@pytest.mark.parametrize(
    "cost, maximize, message",
    [
        ([[float("nan"), 1.0], [1.0, 1.0]], False, "matrix contains invalid numeric entries"),
        ([[1.0, -float("inf")], [1.0, 1.0]], False, "matrix contains invalid numeric entries"),
        ([[1.0, float("inf")], [1.0, 1.0]], True, "matrix contains invalid numeric entries"),
        ([[float("inf"), 1.0], [float("inf"), 1.0]], False, "cost matrix is infeasible"),
        ([[-float("inf"), 1.0], [-float("inf"), 1.0]], True, "cost matrix is infeasible"),
    ],
)
def test_invalid_entries_raise_scipy_errors(cost, maximize, message):
    with pytest.raises(ValueError, match=message):
        ops.linear_sum_assignment(torch.tensor(cost), maximize=maximize)


def test_batch_error_names_the_item():
    cost = torch.rand(4, 3, 3)
    cost[2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"invalid numeric entries \(batch item 2\)"):
        ops.linear_sum_assignment(cost)


def test_check_false_skips_raising_and_leaves_failed_items_unassigned():
    cost = torch.rand(3, 4, 4, dtype=torch.float64)
    cost[1, 0, 0] = float("nan")
    cost[2, :, 0] = float("inf")
    cost[2, :, 1] = float("inf")
    result = ops.linear_sum_assignment(cost, check=False)
    assert (result[1] == -1).all() and (result[2] == -1).all()
    check_against_scipy(cost[0], result[0])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(cost=[[1.0, 2.0]]), TypeError, "cost must be a torch.Tensor"),
        (dict(cost=torch.ones(2, 2, dtype=torch.int64)), TypeError, "cost must be float16"),
        (dict(cost=torch.ones(3)), ValueError, "expected a matrix"),
        (dict(cost=torch.ones(1, 2, 2, 2)), ValueError, "cost must be"),
        (dict(cost=torch.ones(2, 3, 3), num_rows=torch.tensor([3])), ValueError, "num_rows must have shape"),
        (dict(cost=torch.ones(2, 3, 3), num_cols=torch.tensor([1.0, 2.0])), TypeError, "num_cols must be an integer"),
        (dict(cost=torch.ones(2, 3, 3), num_cols=torch.tensor([1, 4])), ValueError, r"num_cols .*outside \[0, 3\]"),
        (dict(cost=torch.ones(2, 3, 3), num_rows=[-1, 2]), ValueError, r"num_rows .*outside \[0, 3\]"),
        (dict(cost=torch.ones(2, 3, 3), num_rows="two"), TypeError, "num_rows must be"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, error, match):
    cost = kwargs.pop("cost")
    with pytest.raises(error, match=match):
        ops.linear_sum_assignment(cost, **kwargs)


def test_op_rejects_bad_counts_without_python_checks():
    # The kernel's own status guards against out-of-range counts when Python checks are skipped.
    cost = torch.rand(2, 3, 3)
    assignment, status = torch.ops.e2evlp.linear_sum_assignment(cost, torch.tensor([3, 9]), None, False)
    assert status.tolist() == [0, 3] and (assignment[1] == -1).all()


def test_assignment_to_indices():
    cost = torch.rand(3, 7, 4, dtype=torch.float64)
    result = ops.linear_sum_assignment(cost, num_rows=torch.tensor([7, 2, 0]))
    pairs = ops.assignment_to_indices(result)
    assert len(pairs) == 3
    for b, (rows, cols) in enumerate(pairs):
        assert torch.equal(rows, torch.nonzero(result[b] >= 0).flatten())
        assert torch.equal(cols, result[b, rows])
        assert rows.dtype == cols.dtype == torch.int64
    assert len(pairs[2][0]) == 0
    rows, cols = ops.assignment_to_indices(result[0])
    assert torch.equal(rows, pairs[0][0]) and torch.equal(cols, pairs[0][1])
    with pytest.raises(TypeError, match="assignment must be an int64"):
        ops.assignment_to_indices(result.float())


def test_opcheck_and_compile():
    cost = torch.rand(3, 6, 4)
    counts = torch.tensor([6, 2, 3])
    torch.library.opcheck(torch.ops.e2evlp.linear_sum_assignment.default, (cost, counts, None, False))
    compiled = torch.compile(lambda c: ops.linear_sum_assignment(c, check=False), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(cost), ops.linear_sum_assignment(cost))


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 9),
    m=st.integers(0, 9),
    data=st.data(),
    maximize=st.booleans(),
)
def test_property_total_equals_scipy(n, m, data, maximize):
    values = data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, 2.5, 7.0, -3.0, float("inf")]),
                                min_size=n * m, max_size=n * m))
    cost = torch.tensor(values, dtype=torch.float64).reshape(n, m)
    exact = cost.numpy()
    try:
        expected = scipy_total(exact, maximize)
    except ValueError as exc:
        with pytest.raises(ValueError, match=str(exc)):
            ops.linear_sum_assignment(cost, maximize=maximize)
        return
    result = ops.linear_sum_assignment(cost, maximize=maximize).numpy()
    assert assignment_total(exact, result) == expected
