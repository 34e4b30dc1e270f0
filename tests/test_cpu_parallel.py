"""The threaded CPU kernels (assignment, matching cost, box losses) equal their one-thread run bit for bit:
from concurrent callers, on a busy machine, after a fork, at every thread count."""

import contextlib
import multiprocessing
import threading

import pytest
import torch

from benchmarks.common import busy_cores
from e2evlp import ops, reference
from tests.box_helpers import matching_inputs, random_cxcywh

C_OPS = torch.ops.e2evlp


@contextlib.contextmanager
def intra_op_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assignment_problems(B: int = 96, seed: int = 0):
    """A batch large enough to be split across threads (~1 ms of work), with every per-problem status in it:
    empty problems, a NaN entry, column counts out of range."""
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(B, 100, 50, generator=g)
    num_cols = torch.randint(0, 51, (B,), generator=g)
    num_cols[3] = 0
    num_cols[7] = 51  # > M
    num_cols[11] = -1
    cost[13, 0, 0] = float("nan")
    num_cols[13] = 50
    return cost, num_cols


def box_pairs(P: int = 20_000, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pred, target = random_cxcywh(P, g, torch.float32), random_cxcywh(P, g, torch.float32)
    grad_l1, grad_giou = torch.randn(P, generator=g), torch.randn(P, generator=g)
    return pred, target, grad_l1, grad_giou


def every_kernel():
    """Runs each threaded CPU kernel on an input big enough to be threaded; returns all the outputs."""
    cost, num_cols = assignment_problems()
    logits, boxes, labels, tboxes, counts = matching_inputs([50, 0, 17, 50, 33] * 8, 100, 91, seed=2)
    pred, target, grad_l1, grad_giou = box_pairs()
    return {
        "assignment": C_OPS.linear_sum_assignment(cost, None, num_cols, False),
        "cost_softmax": C_OPS.matching_cost(logits, boxes, labels, tboxes, counts, 1.0, 5.0, 2.0, "softmax", 0.25, 2.0),
        "cost_focal": C_OPS.matching_cost(logits[..., :-1], boxes, labels, tboxes, counts, 2.0, 5.0, 2.0, "focal", 0.25,
                                          2.0),
        "box_losses": C_OPS.box_losses(pred, target),
        "box_losses_backward": C_OPS.box_losses_backward(grad_l1, grad_giou, pred, target),
    }


def reference_box_losses(pred, target, block: int = 1000):
    """reference.box_losses over blocks of pairs (it builds a [P, P] GIoU matrix)."""
    parts = [reference.box_losses(p, t) for p, t in zip(pred.split(block), target.split(block))]
    return torch.cat([l1 for l1, _ in parts]), torch.cat([giou for _, giou in parts])


def assert_identical(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        for g, w in zip(torch.utils._pytree.tree_leaves(got[name]), torch.utils._pytree.tree_leaves(want[name])):
            assert torch.equal(g, w), f"{name} differs from its one-thread run"


@pytest.fixture(scope="module")
def one_thread_outputs():
    with intra_op_threads(1):
        return every_kernel()


def test_one_thread_run_is_right(one_thread_outputs):
    """The baseline itself: statuses per problem as documented, values as the references give them."""
    assignment, status = one_thread_outputs["assignment"]
    cost, num_cols = assignment_problems()
    assert status[3] == 0 and (assignment[3] == -1).all()
    assert status[7] == 4 and status[11] == 4 and status[13] == 1
    good = [b for b in range(len(cost)) if b not in (7, 11, 13)]
    want = reference.linear_sum_assignment(cost[good], num_cols=num_cols[good].tolist())
    assert torch.equal(assignment[good], want)
    pred, target, _, _ = box_pairs()
    l1, giou = one_thread_outputs["box_losses"]
    want_l1, want_giou = reference_box_losses(pred.double(), target.double())
    torch.testing.assert_close(l1, want_l1.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(giou, want_giou.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threaded_equals_one_thread(one_thread_outputs, threads):
    with intra_op_threads(threads):
        for _ in range(3):
            assert_identical(every_kernel(), one_thread_outputs)


def test_busy_core_equals_one_thread(one_thread_outputs):
    """With another process spinning, helpers are descheduled mid-chunk and the caller takes their chunks back."""
    with intra_op_threads(2), busy_cores():
        for _ in range(5):
            assert_identical(every_kernel(), one_thread_outputs)


def test_concurrent_callers_equal_one_thread(one_thread_outputs):
    """Calls from several Python threads at once share the helpers; each gets its own results."""
    results, errors = [], []

    def call():
        try:
            for _ in range(3):
                results.append(every_kernel())
        except Exception as error:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(error)

    with intra_op_threads(2):
        callers = [threading.Thread(target=call) for _ in range(4)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(timeout=300)
    assert not errors, errors
    assert len(results) == 12
    for got in results:
        assert_identical(got, one_thread_outputs)


def _solve_in_child(queue, cost, num_cols, pred, target):
    # Only e2evlp's kernels run here: after a fork, torch's own OpenMP team (libgomp) can hang the child,
    # which is why DataLoader workers run with one thread.
    assignment = C_OPS.linear_sum_assignment(cost, None, num_cols, False)[0]
    giou = C_OPS.box_losses(pred, target)[1]
    queue.put((assignment.numpy(), giou.numpy()))


def test_forked_child_runs_threaded_kernels(one_thread_outputs):
    """A fork after the helpers started: the child has none of the parent's threads, starts its own, and gives
    the same results."""
    cost, num_cols = assignment_problems()
    pred, target, _, _ = box_pairs()
    with intra_op_threads(2):
        every_kernel()  # the parent's helpers exist now
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_solve_in_child, args=(queue, cost, num_cols, pred, target), daemon=True)
        child.start()
        try:
            assignment, giou = queue.get(timeout=120)
        finally:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    assert child.exitcode == 0
    assert torch.equal(torch.from_numpy(assignment), one_thread_outputs["assignment"][0])
    assert torch.equal(torch.from_numpy(giou), one_thread_outputs["box_losses"][1])


def test_public_ops_on_threaded_sizes():
    """Through the public wrappers (validation, autograd) the threaded kernels give the references' answers."""
    pred, target, _, _ = box_pairs(8_000)
    pred = pred.double().requires_grad_()
    with intra_op_threads(2):
        l1, giou = ops.box_losses(pred, target.double())
        (grad,) = torch.autograd.grad((5 * l1 + 2 * giou).sum(), pred)
    want_l1, want_giou = reference_box_losses(pred, target.double())
    (want_grad,) = torch.autograd.grad((5 * want_l1 + 2 * want_giou).sum(), pred)
    torch.testing.assert_close(l1, want_l1)
    torch.testing.assert_close(giou, want_giou)
    torch.testing.assert_close(grad, want_grad)
