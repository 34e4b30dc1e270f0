"""The CUDA solver against the CPU solver (same tie rule, so the same indices) and scipy; GPU only."""

import pytest
import torch

from e2evlp import ops
from tests.lsap_helpers import assignment_total, scipy_total

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 1, 17), (5, 17, 1), (64, 100, 50), (9, 97, 17), (4, 300, 300),
                                   (3, 1000, 20), (2, 40, 2100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_equals_cpu(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    cost = torch.rand(shape, generator=gen, dtype=dtype)
    on_gpu = ops.linear_sum_assignment(cost.cuda())
    assert on_gpu.device.type == "cuda"
    on_cpu = ops.linear_sum_assignment(cost)
    assert torch.equal(on_gpu.cpu(), on_cpu)
    for b in range(min(shape[0], 8)):
        exact = cost[b].double().numpy()
        assert assignment_total(exact, on_gpu[b].cpu().numpy()) == pytest.approx(scipy_total(exact), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype):
    cost = (torch.randn(16, 40, 25) * 5).to(dtype)
    assert torch.equal(ops.linear_sum_assignment(cost.cuda()).cpu(), ops.linear_sum_assignment(cost))


def test_cuda_ties_maximize_padding_and_strides():
    gen = torch.Generator().manual_seed(1)
    cost = torch.randint(0, 3, (32, 60, 45), generator=gen).double()
    num_rows = torch.randint(0, 61, (32,), generator=gen)
    num_cols = torch.randint(0, 46, (32,), generator=gen)
    poisoned = cost.clone()
    for b in range(32):
        poisoned[b, num_rows[b]:] = float("nan")
        poisoned[b, :, num_cols[b]:] = float("nan")
    for maximize in (False, True):
        cpu = ops.linear_sum_assignment(poisoned, num_rows=num_rows, num_cols=num_cols, maximize=maximize)
        gpu = ops.linear_sum_assignment(poisoned.cuda(), num_rows=num_rows.cuda(), num_cols=num_cols.cuda(),
                                        maximize=maximize)
        assert torch.equal(gpu.cpu(), cpu)
    view = cost.cuda().transpose(1, 2)[:, ::2]
    assert torch.equal(ops.linear_sum_assignment(view).cpu(), ops.linear_sum_assignment(view.cpu()))


def test_cuda_empty_and_constant():
    assert ops.linear_sum_assignment(torch.rand(0, 4, 4, device="cuda")).shape == (0, 4)
    assert (ops.linear_sum_assignment(torch.rand(3, 4, 0, device="cuda")) == -1).all()
    const = ops.linear_sum_assignment(torch.ones(8, 8, device="cuda"))
    assert torch.equal(const.cpu(), torch.arange(8))


def test_cuda_errors_keep_the_context_usable():
    cost = torch.rand(4, 5, 5, device="cuda")
    cost[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"invalid numeric entries \(batch item 1\)"):
        ops.linear_sum_assignment(cost)
    inf = torch.rand(2, 3, 3, device="cuda")
    inf[0, :, 0] = float("inf")
    inf[0, :, 1] = float("inf")
    with pytest.raises(ValueError, match="cost matrix is infeasible"):
        ops.linear_sum_assignment(inf)
    with pytest.raises(ValueError, match="num_cols has a value outside"):
        ops.linear_sum_assignment(torch.rand(2, 3, 3, device="cuda"), num_cols=torch.tensor([3, 7], device="cuda"))
    after = ops.linear_sum_assignment(torch.rand(2, 3, 3, device="cuda"))
    torch.cuda.synchronize()
    assert (after >= 0).all()


def test_cuda_check_false_does_not_sync_and_compiles():
    cost = torch.rand(8, 10, 6, device="cuda")
    compiled = torch.compile(lambda c: ops.linear_sum_assignment(c, check=False), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(cost), ops.linear_sum_assignment(cost))
    torch.library.opcheck(torch.ops.e2evlp.linear_sum_assignment.default, (cost, None, None, False))
