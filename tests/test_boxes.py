"""Box ops against torchvision and DETR's formulas: GIoU, giou_loss, fused box_losses and matching_cost."""

import pytest
import torch
import torchvision.ops

from e2evlp import ops, reference
from tests.box_helpers import matching_inputs, random_cxcywh, random_xyxy
from tests.helpers import gen


def test_conversions_round_trip():
    boxes = random_cxcywh(17, gen())
    xyxy = ops.box_cxcywh_to_xyxy(boxes)
    torch.testing.assert_close(xyxy, torchvision.ops.box_convert(boxes, "cxcywh", "xyxy"))
    torch.testing.assert_close(ops.box_xyxy_to_cxcywh(xyxy), boxes)


@pytest.mark.parametrize("n, m", [(1, 1), (17, 5), (97, 33), (0, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generalized_box_iou_equals_torchvision(n, m, dtype):
    a = random_xyxy(n, gen(n), dtype).requires_grad_()
    b = random_xyxy(m, gen(m + 100), dtype).requires_grad_()
    ours, theirs = ops.generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    weights = torch.randn(n, m, dtype=dtype)
    grads = torch.autograd.grad((ours * weights).sum(), [a, b], allow_unused=True)
    ref_grads = torch.autograd.grad((theirs * weights).sum(), [a, b], allow_unused=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7)


def test_zero_area_boxes_stay_finite():
    point = torch.tensor([[0.3, 0.3, 0.3, 0.3]], requires_grad=True)
    line = torch.tensor([[0.1, 0.5, 0.9, 0.5]])
    assert torch.isnan(torchvision.ops.generalized_box_iou(point, point)).all()  # what we must not do
    g = ops.generalized_box_iou(torch.cat([point, line]), torch.cat([point, line]))
    assert torch.isfinite(g).all()
    g.sum().backward()
    assert torch.isfinite(point.grad).all()


def test_touching_boxes_match_torchvision():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 0.5, 1.0]], dtype=torch.float64, requires_grad=True)
    ours, theirs = ops.generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b)
    torch.testing.assert_close(ours, theirs)
    ga = torch.autograd.grad(ours.sum(), a)[0]
    ta = torch.autograd.grad(theirs.sum(), a)[0]
    torch.testing.assert_close(ga, ta)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_giou_loss_equals_torchvision(reduction, dtype):
    a = random_xyxy(33, gen(1), dtype)
    b = random_xyxy(33, gen(2), dtype)
    a[:3], b[:3] = torch.tensor([0.1, 0.1, 0.1, 0.4]), torch.tensor([0.1, 0.1, 0.1, 0.4])  # zero area, identical
    a.requires_grad_(), b.requires_grad_()
    ours = ops.giou_loss(a, b, reduction=reduction)
    theirs = torchvision.ops.generalized_box_iou_loss(a, b, reduction=reduction)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    ga = torch.autograd.grad(ours.sum(), [a, b])
    ta = torch.autograd.grad(theirs.sum(), [a, b])
    for g, t in zip(ga, ta):
        torch.testing.assert_close(g, t)


def test_giou_loss_empty_mean_is_zero():
    empty = torch.zeros(0, 4)
    assert ops.giou_loss(empty, empty, reduction="mean").item() == 0.0


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[0.5, 0.0, 0.4, 1.0]]), r"boxes1 has invalid xyxy boxes \(x2 < x1"),
    (torch.tensor([[float("nan"), 0.0, 0.4, 1.0]]), "boxes1 contains NaN"),
])
def test_invalid_boxes_raise_naming_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        ops.generalized_box_iou(bad, random_xyxy(2, gen()).float())
    ops.generalized_box_iou(bad, random_xyxy(2, gen()).float(), validate=False)  # validation off: no raise
    with pytest.raises(ValueError, match=match):  # torchvision's argument names: boxes1, boxes2
        ops.giou_loss(bad, bad)
    with pytest.raises(ValueError, match=match.replace("boxes1", "boxes2")):
        ops.giou_loss(random_xyxy(1, gen()).float(), bad)


def test_box_losses_validation():
    good = random_cxcywh(3, gen())
    bad = good.clone()
    bad[1, 2] = -0.1
    with pytest.raises(ValueError, match="target has invalid cxcywh boxes"):
        ops.box_losses(good, bad)
    with pytest.raises(ValueError, match="pred must have 4 coordinates"):
        ops.box_losses(good[:, :3], good[:, :3])
    with pytest.raises(RuntimeError, match=r"pred must be \[P, 4\]"):
        ops.box_losses(good[:, :3], good[:, :3], validate=False)


@pytest.mark.parametrize("n", [1, 17, 97, 0])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_box_losses_equal_detr_formula(n, dtype, tol):
    pred = random_cxcywh(n, gen(n), dtype).requires_grad_()
    target = random_cxcywh(n, gen(n + 1), dtype).requires_grad_()
    l1, giou = ops.box_losses(pred, target)
    rl1, rgiou = reference.box_losses(pred, target)
    torch.testing.assert_close(l1, rl1, rtol=tol, atol=tol)
    torch.testing.assert_close(giou, rgiou, rtol=tol, atol=tol)
    w1, w2 = torch.randn(n, dtype=dtype, generator=gen(3)), torch.randn(n, dtype=dtype, generator=gen(4))
    grads = torch.autograd.grad((l1 * w1 + giou * w2).sum(), [pred, target], allow_unused=True)
    ref = torch.autograd.grad((rl1 * w1 + rgiou * w2).sum(), [pred, target], allow_unused=True)
    for g, r in zip(grads, ref):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r, rtol=tol, atol=tol)


def test_box_losses_ties_and_degenerate_pairs():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2],   # identical pair: every min/max ties
                         [0.5, 0.5, 0.2, 0.2],   # same center, other size
                         [0.3, 0.3, 0.2, 0.2],   # touching the target's left edge
                         [0.4, 0.4, 0.0, 0.0],   # zero-area prediction
                         [0.4, 0.4, 0.0, 0.0]],  # two identical points: union and enclosure 0
                        dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.4, 0.1], [0.5, 0.3, 0.2, 0.2],
                           [0.5, 0.5, 0.2, 0.2], [0.4, 0.4, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    l1, giou = ops.box_losses(pred, target)
    assert torch.isfinite(l1).all() and torch.isfinite(giou).all()
    grads = torch.autograd.grad((l1 + giou).sum(), [pred, target])
    assert all(torch.isfinite(g).all() for g in grads)
    rl1, rgiou = reference.box_losses(pred[:4], target[:4])  # the plain formula is defined on the first four
    torch.testing.assert_close(giou[:4], rgiou)
    ref = torch.autograd.grad((rl1 + rgiou).sum(), [pred, target])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g[:4], r[:4])
    assert giou[0].item() == pytest.approx(0.0) and giou[4].item() == pytest.approx(1.0)


def test_box_losses_gradcheck_and_opcheck():
    pred = random_cxcywh(9, gen(5)).requires_grad_()
    target = random_cxcywh(9, gen(6)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.box_losses(a, b), (pred, target))
    torch.library.opcheck(torch.ops.e2evlp.box_losses.default, (pred, target))
    grads = (torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64))
    torch.library.opcheck(torch.ops.e2evlp.box_losses_backward.default, (*grads, pred.detach(), target.detach()))


def test_box_losses_backward_checks_its_gradients():
    pred, target = random_cxcywh(3, gen(7)), random_cxcywh(3, gen(8))
    backward = torch.ops.e2evlp.box_losses_backward.default
    grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="grad_l1 is on meta but the predictions are on cpu"):
        backward(grad.to("meta"), grad, pred, target)
    with pytest.raises(RuntimeError, match="grad_giou must be float16, bfloat16, float32 or float64"):
        backward(grad, grad.long(), pred, target)
    with pytest.raises(RuntimeError, match=r"grad_giou must be \[3\]"):
        backward(grad, grad[:2], pred, target)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_losses_half_inputs(dtype):
    pred = random_cxcywh(20, gen(7)).to(dtype).requires_grad_()
    target = random_cxcywh(20, gen(8)).to(dtype)
    l1, giou = ops.box_losses(pred, target)
    assert l1.dtype == dtype and giou.dtype == dtype
    _, rgiou = reference.box_losses(pred.float(), target.float())
    torch.testing.assert_close(giou.float(), rgiou, rtol=1e-2, atol=1e-2)
    # The L1 is computed in float32 and rounded once to dtype: within half an ulp, eps / 2 relative
    # (measured: 0.38 eps for float16, 0.41 eps for bfloat16); rtol = eps leaves a factor 2.
    rl1 = reference.box_losses(pred.detach().double(), target.double())[0]
    torch.testing.assert_close(l1.double(), rl1, rtol=torch.finfo(dtype).eps, atol=0)
    (l1.float().sum() + giou.float().sum()).backward()
    assert pred.grad.dtype == dtype and torch.isfinite(pred.grad.float()).all()


@pytest.mark.parametrize("class_cost", ["softmax", "focal"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("sizes, Q", [([3, 0, 7, 1], 10), ([1], 1), ([40, 2], 17), ([0, 0], 5)])
def test_matching_cost_equals_detr_blocks(class_cost, dtype, tol, sizes, Q):
    inputs = matching_inputs(sizes, Q, 7, seed=len(sizes) * Q, dtype=dtype, focal=class_cost == "focal")
    kwargs = dict(w_class=2.0, w_bbox=5.0, w_giou=2.0, class_cost=class_cost)
    ours = ops.matching_cost(*inputs, **kwargs)
    ref = reference.matching_cost(*inputs, **kwargs)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matching_cost_half_inputs_are_computed_in_float32(dtype):
    logits, boxes, labels, tboxes, n = matching_inputs([5, 3], 11, 4, seed=1)
    ours = ops.matching_cost(logits.to(dtype), boxes.to(dtype), labels, tboxes, n)
    assert ours.dtype == torch.float32
    ref = reference.matching_cost(logits.to(dtype).float(), boxes.to(dtype).float(), labels, tboxes, n)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_matching_cost_bad_inputs():
    logits, boxes, labels, tboxes, n = matching_inputs([2, 3], 4, 3, seed=2)
    bad_labels = labels.clone()
    bad_labels[1, 2] = 9
    with pytest.raises(ValueError, match="tgt_labels has a label outside"):
        ops.matching_cost(logits, boxes, bad_labels, tboxes, n)
    unchecked = ops.matching_cost(logits, boxes, bad_labels, tboxes, n, validate=False)
    assert torch.isnan(unchecked[1, :, 2]).all() and torch.isfinite(unchecked[0]).all()
    with pytest.raises(ValueError, match=r"num_targets has a value outside \[0, 3\]"):
        ops.matching_cost(logits, boxes, labels, tboxes, torch.tensor([2, 4]))
    assert torch.isnan(ops.matching_cost(logits, boxes, labels, tboxes, torch.tensor([2, 4]), validate=False)[1]).all()
    with pytest.raises(ValueError, match="class_cost must be one of"):
        ops.matching_cost(logits, boxes, labels, tboxes, n, class_cost="sigmoid")
    with pytest.raises(TypeError, match="tgt_labels must be an integer tensor"):
        ops.matching_cost(logits, boxes, labels.float(), tboxes, n)
    nan_logits = logits.clone()
    nan_logits[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pred_logits contains NaN"):
        ops.matching_cost(nan_logits, boxes, labels, tboxes, n)
    with pytest.raises(RuntimeError, match=r"pred_boxes must be \[2, 4, 4\]"):
        ops.matching_cost(logits, boxes[:, :3], labels, tboxes, n, validate=False)


def test_matching_cost_opcheck():
    inputs = matching_inputs([2, 3], 4, 3, seed=3)
    torch.library.opcheck(torch.ops.e2evlp.matching_cost.default,
                          (*inputs, 1.0, 5.0, 2.0, "softmax", 0.25, 2.0))
