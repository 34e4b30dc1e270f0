"""The box ops as drop-ins for torchvision's: integer and half boxes (values and dtypes), torchvision's
argument names and errors, batched GIoU, and TorchScript."""

import inspect

import pytest
import torch
import torchvision.ops

from e2evlp import ops
from tests.box_helpers import random_xyxy
from tests.helpers import gen

INTEGER = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
HALF = [torch.float16, torch.bfloat16]
# torch 2.14 deprecates TorchScript (FutureWarning) but still runs it, as torchvision's box ops still support it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
SCRIPTABLE = ["box_area", "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "generalized_box_iou", "giou_loss"]


def integer_xyxy(n: int, generator: torch.Generator, dtype: torch.dtype, high: int = 30) -> torch.Tensor:
    """Integer xyxy boxes of positive area with coordinates in [0, 2 * high]: no int8 arithmetic overflows."""
    corner = torch.randint(0, high, (n, 2), generator=generator)
    size = torch.randint(1, high + 1, (n, 2), generator=generator)
    return torch.cat([corner, corner + size], dim=1).to(dtype)


@pytest.mark.parametrize("dtype", INTEGER + HALF + [torch.float32, torch.float64])
def test_box_area_equals_torchvision(dtype):
    boxes = integer_xyxy(23, gen(1), dtype)  # int8 areas overflow int8: torchvision computes them in int32
    ours, theirs = ops.box_area(boxes), torchvision.ops.box_area(boxes)
    assert ours.dtype == theirs.dtype  # int32 for (u)int8/int16, int64 for int64, float32 for half
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["xyxy", "xywh", "cxcywh"])
def test_box_area_formats_equal_torchvision(fmt):
    boxes = random_xyxy(11, gen(2))
    torch.testing.assert_close(ops.box_area(boxes, fmt), torchvision.ops.box_area(boxes, fmt=fmt), rtol=0, atol=0)
    torch.testing.assert_close(ops.box_area(boxes, fmt=fmt), torchvision.ops.box_area(boxes, fmt=fmt), rtol=0, atol=0)
    with pytest.raises(ValueError, match="Unsupported"):
        ops.box_area(boxes, "xyxyxyxy")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64] + HALF)
@pytest.mark.parametrize("n, m", [(1, 1), (17, 5), (0, 3)])
def test_generalized_box_iou_integer_and_half_equal_torchvision(dtype, n, m):
    a, b = integer_xyxy(n, gen(n), dtype), integer_xyxy(m, gen(m + 50), dtype)
    ours, theirs = ops.generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_generalized_box_iou_small_integers_are_upcast_first(dtype):
    """Coordinates as far apart as the dtype allows: computed in int32 from the start, so nothing wraps
    (torchvision subtracts uint8/int8 coordinates before it upcasts)."""
    low, high = (0, 255) if dtype == torch.uint8 else (-128, 127)
    a = torch.tensor([[low, low, low + 10, low + 10], [low, low, high, high]])
    b = torch.tensor([[high - 10, high - 10, high, high], [low + 5, low + 5, low + 20, low + 30]])
    ours = ops.generalized_box_iou(a.to(dtype), b.to(dtype))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, torchvision.ops.generalized_box_iou(a, b), rtol=0, atol=0)  # int64 inputs


@pytest.mark.parametrize("dtype", INTEGER + HALF)
def test_conversions_equal_torchvision(dtype):
    boxes = integer_xyxy(19, gen(2), dtype)
    conversions = ((ops.box_cxcywh_to_xyxy, ("cxcywh", "xyxy")), (ops.box_xyxy_to_cxcywh, ("xyxy", "cxcywh")))
    for ours, (src, dst) in conversions:
        got, want = ours(boxes), torchvision.ops.box_convert(boxes, src, dst)
        assert got.dtype == want.dtype  # float32 for integer boxes, the input dtype for half ones
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_generalized_box_iou_batched_equals_torchvision():
    a = random_xyxy(2 * 3 * 7, gen(3)).view(2, 3, 7, 4).requires_grad_()
    b = random_xyxy(3 * 5, gen(4)).view(3, 5, 4).requires_grad_()  # broadcast over the leading dimension
    ours, theirs = ops.generalized_box_iou(a, b), torchvision.ops.generalized_box_iou(a, b)
    assert ours.shape == theirs.shape == (2, 3, 7, 5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    grads = torch.autograd.grad(ours.sum(), [a, b])
    ref_grads = torch.autograd.grad(theirs.sum(), [a, b])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.float16])
def test_giou_loss_integer_and_half_equal_torchvision(dtype):
    a, b = integer_xyxy(21, gen(5), dtype), integer_xyxy(21, gen(6), dtype)
    ours, theirs = ops.giou_loss(a, b), torchvision.ops.generalized_box_iou_loss(a, b)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_giou_loss_takes_torchvisions_arguments():
    ours = list(inspect.signature(ops.giou_loss).parameters.values())[:4]
    theirs = list(inspect.signature(torchvision.ops.generalized_box_iou_loss).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in theirs]
    a, b = random_xyxy(9, gen(7)), random_xyxy(9, gen(8))
    want = torchvision.ops.generalized_box_iou_loss(a, b, "sum", 1e-5)
    torch.testing.assert_close(ops.giou_loss(a, b, "sum", 1e-5), want, rtol=0, atol=0)
    torch.testing.assert_close(ops.giou_loss(boxes1=a, boxes2=b, reduction="sum", eps=1e-5), want, rtol=0, atol=0)
    torch.testing.assert_close(ops.giou_loss(a, b, reduction="sum", eps=1e-5, validate=False), want, rtol=0, atol=0)


def test_giou_loss_invalid_reduction_raises_like_torchvision():
    a = random_xyxy(3, gen(9))
    with pytest.raises(ValueError, match="Invalid"):
        torchvision.ops.generalized_box_iou_loss(a, a, reduction="avg")
    with pytest.raises(ValueError, match=r"Invalid value for argument 'reduction': 'avg'"):
        ops.giou_loss(a, a, reduction="avg")


def scripted_callers(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Code that calls our box ops, for torch.jit.script to compile with them."""
    xyxy = ops.box_cxcywh_to_xyxy(ops.box_xyxy_to_cxcywh(a))
    return (ops.generalized_box_iou(xyxy, b).sum() + ops.giou_loss(xyxy, b, "mean") + ops.box_area(b).sum()
            + ops.giou_loss(boxes1=b, boxes2=xyxy, reduction="sum", eps=1e-6, validate=False))


@pytest.mark.parametrize("name", SCRIPTABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32])
def test_box_ops_script_like_torchvisions(name, dtype):
    eager = getattr(ops, name)
    scripted = torch.jit.script(eager)
    a = random_xyxy(6, gen(10)) * 50
    b = random_xyxy(6 if name == "giou_loss" else 4, gen(11)) * 50
    a, b = a.to(dtype), b.to(dtype)
    args = (a, b) if name in ("generalized_box_iou", "giou_loss") else (a,)
    want = eager(*args)
    torch.testing.assert_close(scripted(*args), want, rtol=0, atol=0)
    if name == "giou_loss":
        for reduction in ("mean", "sum"):
            torch.testing.assert_close(scripted(a, b, reduction, 1e-6), eager(a, b, reduction, 1e-6), rtol=0, atol=0)


def test_scripted_box_ops_keep_validation_and_gradients():
    giou, loss = torch.jit.script(ops.generalized_box_iou), torch.jit.script(ops.giou_loss)
    bad = torch.tensor([[0.5, 0.0, 0.4, 1.0]])
    good = random_xyxy(1, gen(12)).float()
    with pytest.raises(Exception, match=r"boxes1 has invalid xyxy boxes \(x2 < x1"):  # torch.jit.Error
        giou(bad, good)
    with pytest.raises(Exception, match="boxes2 contains NaN"):
        loss(good, torch.full((1, 4), float("nan")))
    with pytest.raises(Exception, match="Invalid value for argument 'reduction'"):
        loss(good, good, "avg")
    assert giou(bad, good, False).shape == (1, 1)  # validation off: no raise
    a = random_xyxy(5, gen(13)).requires_grad_()
    b = random_xyxy(5, gen(14))
    got = torch.autograd.grad(loss(a, b, "sum"), a)[0]
    want = torch.autograd.grad(torchvision.ops.generalized_box_iou_loss(a, b, "sum"), a)[0]
    torch.testing.assert_close(got, want)


def test_code_calling_box_ops_scripts():
    scripted = torch.jit.script(scripted_callers)
    a, b = random_xyxy(7, gen(15)), random_xyxy(7, gen(16))
    torch.testing.assert_close(scripted(a, b), scripted_callers(a, b), rtol=0, atol=0)
