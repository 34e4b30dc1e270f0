"""Box ops, matcher and criterion on CUDA against the CPU kernels (same box_math.h); GPU only."""

import warnings

import pytest
import torch

from e2evlp import nn as enn
from e2evlp import ops
from tests.box_helpers import detr_batch, matching_inputs, random_cxcywh

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("class_cost", ["softmax", "focal"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.float16, 1e-6)])
@pytest.mark.parametrize("sizes, Q, C", [([3, 0, 7, 1], 10, 7), ([50, 17], 100, 91), ([1], 1, 1)])
def test_matching_cost_cuda_equals_cpu(class_cost, dtype, tol, sizes, Q, C):
    inputs = matching_inputs(sizes, Q, C, seed=Q, dtype=dtype, focal=class_cost == "focal")
    kwargs = dict(w_class=2.0, w_bbox=5.0, w_giou=2.0, class_cost=class_cost)
    cpu = ops.matching_cost(*inputs, **kwargs)
    gpu = ops.matching_cost(*(t.cuda() for t in inputs), **kwargs)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=tol, atol=tol)


def test_matching_cost_cuda_poisons_bad_labels():
    logits, boxes, labels, tboxes, n = (t.cuda() for t in matching_inputs([2, 3], 4, 3, seed=2))
    labels[1, 2] = 9
    cost = ops.matching_cost(logits, boxes, labels, tboxes, n)  # validation is off on CUDA by default
    assert torch.isnan(cost[1, :, 2]).all() and torch.isfinite(cost[0]).all()
    with pytest.raises(ValueError, match="tgt_labels has a label outside"):
        ops.matching_cost(logits, boxes, labels, tboxes, n, validate=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_box_losses_cuda_equals_cpu(dtype, tol):
    g = torch.Generator().manual_seed(0)
    pred = random_cxcywh(1000, g, dtype)
    target = random_cxcywh(1000, g, dtype)
    target[:10] = pred[:10]  # ties
    pred[10:20, 2:] = 0  # zero area
    results = {}
    for device in ("cpu", "cuda"):
        p, t = pred.to(device).requires_grad_(), target.to(device).requires_grad_()
        l1, giou = ops.box_losses(p, t)
        (l1 * 0.3 + giou * 1.7).sum().backward()
        results[device] = [x.detach().cpu() for x in (l1, giou, p.grad, t.grad)]
    for a, b in zip(results["cuda"], results["cpu"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    torch.library.opcheck(torch.ops.e2evlp.box_losses.default, (pred[:8].cuda(), target[:8].cuda()))


def test_matcher_and_criterion_cuda_equal_cpu_with_one_sync():
    g = torch.Generator().manual_seed(3)
    outputs, targets = detr_batch([5, 0, 12, 50], queries=100, classes=91, generator=g, layers=6, attributes=10)
    matcher = enn.HungarianMatcher(1, 5, 2)
    criterion = enn.SetCriterion(91, matcher, {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2, "loss_attr": 1}, 0.1,
                                 ["labels", "boxes", "cardinality", "attributes"], num_attributes=10)
    cpu_losses = criterion(outputs, targets)

    def to_cuda(layer):
        moved = {k: v.cuda() for k, v in layer.items() if k != "aux_outputs"}
        if "aux_outputs" in layer:
            moved["aux_outputs"] = [to_cuda(a) for a in layer["aux_outputs"]]
        return moved

    criterion.cuda()  # its eos_coef class weights are a buffer, as in DETR
    gpu_outputs = to_cuda(outputs)
    gpu_targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    criterion(gpu_outputs, gpu_targets)  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            gpu_losses = criterion(gpu_outputs, gpu_targets)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
    for key, value in cpu_losses.items():
        torch.testing.assert_close(gpu_losses[key].cpu(), value, rtol=1e-4, atol=1e-4, msg=key)


def test_matcher_with_host_targets_syncs_once():
    g = torch.Generator().manual_seed(4)
    outputs, targets = detr_batch([7, 0, 30], queries=100, classes=91, generator=g)
    matcher = enn.HungarianMatcher(1, 5, 2)
    gpu_outputs = {k: v.cuda() for k, v in outputs.items()}
    expected = matcher(gpu_outputs, [{k: v.cuda() for k, v in t.items()} for t in targets])
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            indices = matcher(gpu_outputs, targets)  # the targets stay on the host, as a data loader gives them
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
    for (i, j), (ei, ej) in zip(indices, expected):
        assert torch.equal(i.cpu(), ei.cpu()) and torch.equal(j.cpu(), ej.cpu())
