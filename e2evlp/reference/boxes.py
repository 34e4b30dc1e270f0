"""Reference twins of the box ops: DETR's plain formulas in PyTorch, with torchvision's GIoU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.ops


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """torchvision's conversion, so the oracle shares no box code with e2evlp.ops."""
    return torchvision.ops.box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def box_losses(pred: torch.Tensor, target: torch.Tensor):
    """DETR's loss_boxes per pair: L1 summed over cxcywh, and 1 - diag(GIoU matrix) as DETR computes it."""
    l1 = F.l1_loss(pred, target, reduction="none").sum(-1)
    giou = 1 - torch.diag(torchvision.ops.generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target)))
    return l1, giou


def class_cost_block(logits: torch.Tensor, labels: torch.Tensor, class_cost: str = "softmax", focal_alpha: float = 0.25,
                     focal_gamma: float = 2.0) -> torch.Tensor:
    """[Q, T] class cost: DETR's -softmax prob, or Deformable-DETR's focal cost on sigmoid probs."""
    if class_cost == "softmax":
        return -logits.softmax(-1)[:, labels]
    prob = logits.sigmoid()
    neg = (1 - focal_alpha) * (prob**focal_gamma) * (-(1 - prob + 1e-8).log())
    pos = focal_alpha * ((1 - prob) ** focal_gamma) * (-(prob + 1e-8).log())
    return pos[:, labels] - neg[:, labels]


def cost_block(logits, boxes, labels, tgt_boxes, *, w_class=1.0, w_bbox=1.0, w_giou=1.0, class_cost="softmax",
               focal_alpha=0.25, focal_gamma=2.0) -> torch.Tensor:
    """DETR's weighted matching cost between queries [Q] and targets [T] (of one image or a whole batch)."""
    cost_class = class_cost_block(logits, labels, class_cost, focal_alpha, focal_gamma)
    cost_bbox = torch.cdist(boxes, tgt_boxes.to(boxes.dtype), p=1)
    cost_giou = -torchvision.ops.generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    return w_bbox * cost_bbox + w_class * cost_class + w_giou * cost_giou


def matching_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, *, w_class=1.0, w_bbox=1.0,
                  w_giou=1.0, class_cost="softmax", focal_alpha=0.25, focal_gamma=2.0) -> torch.Tensor:
    """Twin of e2evlp.ops.matching_cost: one DETR cost block per image, in float32 (float64 for float64)."""
    dtype = torch.float64 if torch.float64 in (pred_logits.dtype, pred_boxes.dtype) else torch.float32
    B, Q, _ = pred_logits.shape
    out = torch.zeros(B, Q, tgt_labels.shape[1], dtype=dtype, device=pred_logits.device)
    for b, n in enumerate(torch.as_tensor(num_targets).tolist()):
        out[b, :, :n] = cost_block(pred_logits[b].to(dtype), pred_boxes[b].to(dtype), tgt_labels[b, :n],
                                   tgt_boxes[b, :n].to(dtype), w_class=w_class, w_bbox=w_bbox, w_giou=w_giou,
                                   class_cost=class_cost, focal_alpha=focal_alpha, focal_gamma=focal_gamma)
    return out
