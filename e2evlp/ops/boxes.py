"""Box conversions, GIoU, and the fused box ops: DETR's matching cost and per-pair L1 + GIoU losses."""

from __future__ import annotations

import torch

from e2evlp import _ext

CLASS_COSTS = ("softmax", "focal")


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """cxcywh → xyxy, as torchvision.ops.box_convert(boxes, "cxcywh", "xyxy"): integer boxes give float32."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """xyxy → cxcywh, as torchvision.ops.box_convert(boxes, "xyxy", "cxcywh"): integer boxes give float32."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def box_area(boxes: torch.Tensor, fmt: str = "xyxy") -> torch.Tensor:
    """Areas [...] of boxes [..., 4], as torchvision.ops.box_area: computed in float32/float64 for floating
    boxes (float16/bfloat16 give float32) and in int32/int64 for integer ones (int8/int16/uint8 give int32)."""
    if fmt not in ("xyxy", "xywh", "cxcywh"):
        raise ValueError(f"Unsupported Bounding Box area for given format {fmt}")
    boxes = _upcast(boxes)
    if fmt == "xyxy":
        return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return boxes[..., 2] * boxes[..., 3]


def _validation_on(validate: bool | None, tensor: torch.Tensor) -> bool:
    """Validation costs a host sync on a GPU: on by default on the CPU only."""
    if validate is None:
        return tensor.device.type == "cpu"
    return validate


def _shape_text(t: torch.Tensor) -> str:
    if torch.jit.is_scripting():
        return str(t.shape)
    else:
        return str(tuple(t.shape))


def _dtype_text(t: torch.Tensor) -> str:
    if torch.jit.is_scripting():
        return f"dtype code {t.dtype}"  # TorchScript has no dtype names
    else:
        return str(t.dtype)


def validate_boxes(boxes: torch.Tensor, name: str, fmt: str = "xyxy", integer: bool = False) -> None:
    """Raises ValueError naming `name` for NaN or inverted boxes (x2 < x1, or w < 0 in cxcywh).

    Boxes must be floating-point (TypeError otherwise), or integer too with ``integer=True``. TorchScript
    compiles it, so scripted callers validate as eager ones do.
    """
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a floating-point tensor of boxes, got {type(boxes)}")
    if integer:
        if boxes.dtype == torch.bool or boxes.is_complex():
            raise TypeError(f"{name} must be a floating-point or integer tensor of boxes, got {_dtype_text(boxes)}")
    elif not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of boxes, got {_dtype_text(boxes)}")
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have 4 coordinates in its last dimension, got shape {_shape_text(boxes)}")
    if boxes.numel() == 0:
        return
    if boxes.is_floating_point() and bool(torch.isnan(boxes).any()):
        raise ValueError(f"{name} contains NaN")
    if fmt == "xyxy":
        inverted = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
        what = "x2 < x1 or y2 < y1"
    else:
        inverted = (boxes[..., 2] < 0) | (boxes[..., 3] < 0)
        what = "a negative width or height"
    if bool(inverted.any()):
        raise ValueError(f"{name} has invalid {fmt} boxes ({what})")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """torchvision's upcast against overflow: float16/bfloat16 → float32, int8/int16/uint8 → int32."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def _upcast_to_float(t: torch.Tensor) -> torch.Tensor:
    """float32/float64 as they are, anything else (half, integer) → float32, as torchvision's losses do."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0, with finite gradients in both branches."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), torch.zeros_like(num))


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, validate: bool | None = None) -> torch.Tensor:
    """Pairwise GIoU [..., N, M] of xyxy boxes [..., N, 4] and [..., M, 4]: torchvision's values, dtypes
    (float32 for half and integer boxes) and gradients, but finite on zero-area boxes.

    ``validate`` (default: on for CPU tensors, off on CUDA where it costs a sync) raises ValueError on NaN
    or inverted boxes. Integer boxes are upcast (int8/int16/uint8 to int32) before any arithmetic.
    """
    if _validation_on(validate, boxes1):
        validate_boxes(boxes1, "boxes1", "xyxy", True)
        validate_boxes(boxes2, "boxes2", "xyxy", True)
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[..., None, :2], boxes2[..., None, :, :2])  # [..., N, M, 2]
    rb = torch.min(boxes1[..., None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # [..., N, M]
    union = area1[..., None] + area2[..., None, :] - inter
    iou = _safe_div(inter, union)
    lti = torch.min(boxes1[..., None, :2], boxes2[..., None, :, :2])
    rbi = torch.max(boxes1[..., None, 2:], boxes2[..., None, :, 2:])
    whi = (rbi - lti).clamp(min=0)
    enclose = whi[..., 0] * whi[..., 1]
    return iou - _safe_div(enclose - union, enclose)


def giou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, reduction: str = "none", eps: float = 1e-7,
              validate: bool | None = None) -> torch.Tensor:
    """1 - GIoU of aligned xyxy box pairs: torchvision.ops.generalized_box_iou_loss's signature, values,
    dtypes (float32 for half and integer boxes) and gradients.

    ``validate`` (default: on for CPU tensors, off on CUDA where it costs a sync) raises ValueError on NaN
    or inverted boxes.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"Invalid value for argument 'reduction': '{reduction}'; "
                         "supported reduction modes: 'none', 'mean', 'sum'")
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"boxes1 and boxes2 must have the same shape, got {_shape_text(boxes1)} and "
                         f"{_shape_text(boxes2)}")
    if _validation_on(validate, boxes1):
        validate_boxes(boxes1, "boxes1", "xyxy", True)
        validate_boxes(boxes2, "boxes2", "xyxy", True)
    boxes1, boxes2 = _upcast_to_float(boxes1), _upcast_to_float(boxes2)
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    ix1, iy1 = torch.max(x1, x1g), torch.max(y1, y1g)
    ix2, iy2 = torch.min(x2, x2g), torch.min(y2, y2g)
    overlaps = (iy2 > iy1) & (ix2 > ix1)
    inter = torch.where(overlaps, (ix2 - ix1) * (iy2 - iy1), torch.zeros_like(x1))
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    enclose = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    loss = 1 - (iou - (enclose - union) / (enclose + eps))
    if reduction == "mean":
        return loss.mean() if loss.numel() > 0 else 0.0 * loss.sum()
    if reduction == "sum":
        return loss.sum()
    return loss


def box_losses(pred: torch.Tensor, target: torch.Tensor, *, validate: bool | None = None):
    """Per-pair L1 (summed over cx, cy, w, h) and GIoU loss 1 - GIoU of matched cxcywh boxes [P, 4].

    One fused kernel forward and one backward (CPU and CUDA), differentiable in both arguments.
    Equals DETR's plain formula on non-degenerate boxes; zero-area boxes give finite values and
    gradients. Returns ``(l1 [P], giou [P])``.
    """
    if _validation_on(validate, pred):
        validate_boxes(pred, "pred", "cxcywh")
        validate_boxes(target, "target", "cxcywh")
    _ext.require(pred.device)
    return torch.ops.e2evlp.box_losses(pred, target)


def matching_cost(pred_logits: torch.Tensor, pred_boxes: torch.Tensor, tgt_labels: torch.Tensor,
                  tgt_boxes: torch.Tensor, num_targets: torch.Tensor, *, w_class: float = 1.0, w_bbox: float = 1.0,
                  w_giou: float = 1.0, class_cost: str = "softmax", focal_alpha: float = 0.25,
                  focal_gamma: float = 2.0, validate: bool | None = None) -> torch.Tensor:
    """DETR's matching cost per image, padded: ``[B, Q, T]`` from one fused kernel (no gradient).

    ``w_bbox·L1(cxcywh) + w_class·class + w_giou·(−GIoU)`` between every query and every valid target
    of the same image; class is ``−softmax(pred_logits)[label]`` (DETR) or Deformable-DETR's focal cost
    on ``sigmoid(pred_logits)``. Entries for targets ``t ≥ num_targets[b]`` are 0: pass
    ``num_cols=num_targets`` to the solver. Computed in float32 (float64 for float64 inputs).
    Out-of-range labels or counts make that item's costs NaN (the solver then refuses it);
    ``validate`` (default: on for CPU tensors, off on CUDA where it costs a sync) raises instead.
    """
    if class_cost not in CLASS_COSTS:
        raise ValueError(f"class_cost must be one of {CLASS_COSTS}, got {class_cost!r}")
    if _validation_on(validate, pred_logits):
        _validate_matching_inputs(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets)
    _ext.require(pred_logits.device)
    return torch.ops.e2evlp.matching_cost(pred_logits.detach(), pred_boxes.detach(), tgt_labels, tgt_boxes.detach(),
                                          num_targets, float(w_class), float(w_bbox), float(w_giou), class_cost,
                                          float(focal_alpha), float(focal_gamma))


def _validate_matching_inputs(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets) -> None:
    for name, t in (("pred_logits", pred_logits), ("pred_boxes", pred_boxes), ("tgt_boxes", tgt_boxes)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor")
    for name, t in (("tgt_labels", tgt_labels), ("num_targets", num_targets)):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor")
    if pred_logits.dim() != 3 or tgt_labels.dim() != 2 or num_targets.dim() != 1:
        raise ValueError("expected pred_logits [B, Q, C], tgt_labels [B, T] and num_targets [B], got shapes "
                         f"{tuple(pred_logits.shape)}, {tuple(tgt_labels.shape)}, {tuple(num_targets.shape)}")
    if bool(torch.isnan(pred_logits).any()):
        raise ValueError("pred_logits contains NaN")
    validate_boxes(pred_boxes, "pred_boxes", "cxcywh")
    T = tgt_labels.shape[1]
    if num_targets.numel() and bool(((num_targets < 0) | (num_targets > T)).any()):
        raise ValueError(f"num_targets has a value outside [0, {T}]")
    valid = torch.arange(T, device=tgt_labels.device)[None, :] < num_targets[:, None]
    classes = pred_logits.shape[-1]
    if bool(((tgt_labels < 0) | (tgt_labels >= classes))[valid].any()):
        raise ValueError(f"tgt_labels has a label outside [0, {classes}) (pred_logits has {classes} classes)")
    validate_boxes(tgt_boxes[valid], "tgt_boxes", "cxcywh")


def _box_losses_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _box_losses_backward(ctx, grad_l1, grad_giou):
    pred, target = ctx.saved_tensors
    grad_pred, grad_target = torch.ops.e2evlp.box_losses_backward(grad_l1.contiguous(), grad_giou.contiguous(),
                                                                   pred, target)
    return (grad_pred if ctx.needs_input_grad[0] else None, grad_target if ctx.needs_input_grad[1] else None)


if _ext.available():
    torch.library.register_autograd("e2evlp::box_losses", _box_losses_backward,
                                    setup_context=_box_losses_setup_context)
