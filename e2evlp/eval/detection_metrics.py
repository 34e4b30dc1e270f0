"""COCO-style detection average precision: greedy per-class matching, 101-point interpolated AP."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchvision.ops import box_iou

COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
_RECALL_POINTS = torch.linspace(0, 1, 101, dtype=torch.float64)


def _match_image(ious: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """True positives among one image's detections of one class; `ious` [dets, targets] rows in score order."""
    is_tp = torch.zeros(ious.shape[0], dtype=torch.bool)
    taken = torch.zeros(ious.shape[1], dtype=torch.bool)
    if ious.shape[1] == 0:
        return is_tp
    for rank, row in enumerate(ious):
        # Each target is matched once: the free target with the highest IoU, if it reaches the threshold.
        candidates = row.masked_fill(taken, -1.0)
        best = int(candidates.argmax())
        if candidates[best] >= iou_threshold:
            taken[best] = True
            is_tp[rank] = True
    return is_tp


def _interpolated_ap(scores: torch.Tensor, is_tp: torch.Tensor, num_targets: int) -> float:
    """Mean precision at recall 0, 0.01, ..., 1 of the precision envelope (COCO's 101 points)."""
    if len(scores) == 0:
        return 0.0
    order = torch.argsort(scores, descending=True, stable=True)
    tp = is_tp[order].double().cumsum(0)
    precision = tp / torch.arange(1, len(tp) + 1, dtype=torch.float64)
    recall = tp / num_targets
    # Envelope: the best precision reachable at this recall or any higher one.
    precision = precision.flip(0).cummax(0).values.flip(0)
    index = torch.searchsorted(recall, _RECALL_POINTS, side="left")
    reached = index < len(recall)
    return precision[index[reached]].sum().item() / len(_RECALL_POINTS)


def _class_aps(
    predictions: Sequence[Mapping], targets: Sequence[Mapping], label: int, iou_thresholds: Sequence[float]
) -> list[float]:
    """AP of one class at each IoU threshold; IoUs are computed once and reused across thresholds."""
    scores, ious, num_targets = [], [], 0
    for pred, target in zip(predictions, targets):
        pred_mask = pred["labels"] == label
        gt_boxes = target["boxes"][target["labels"] == label].float()
        num_targets += len(gt_boxes)
        image_scores, order = torch.sort(pred["scores"][pred_mask].float(), descending=True, stable=True)
        scores.append(image_scores)
        ious.append(box_iou(pred["boxes"][pred_mask].float()[order], gt_boxes))
    all_scores = torch.cat(scores)
    return [
        _interpolated_ap(all_scores, torch.cat([_match_image(iou, t) for iou in ious]), num_targets)
        for t in iou_thresholds
    ]


def _check_inputs(predictions: Sequence[Mapping], targets: Sequence[Mapping], num_classes: int | None) -> None:
    if not targets:
        raise ValueError("targets is empty")
    if len(predictions) != len(targets):
        raise ValueError(f"predictions has {len(predictions)} images but targets has {len(targets)}")
    if num_classes is None:
        return
    for name, items in (("predictions", predictions), ("targets", targets)):
        for item in items:
            labels = item["labels"]
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"{name} has labels outside [0, {num_classes})")


def detection_ap(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, torch.Tensor]],
    iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
    num_classes: int | None = None,
) -> dict[str, float]:
    """COCO-style AP over the classes present in `targets` (no area ranges, crowd regions or max-dets cap).

    predictions[i]: boxes [N, 4] xyxy, scores [N], labels [N]; targets[i]: boxes [M, 4], labels [M], in the
    same units (absolute or normalized). Returns "ap" (mean over `iou_thresholds`, COCO's 0.50:0.95 by
    default) and "ap50" (IoU 0.5).
    """
    _check_inputs(predictions, targets, num_classes)
    classes = torch.unique(torch.cat([target["labels"].reshape(-1).long().cpu() for target in targets]))
    if len(classes) == 0:
        raise ValueError("targets has no boxes; AP is undefined")
    predictions = [{key: value.detach().cpu() for key, value in pred.items()} for pred in predictions]
    targets = [{key: value.detach().cpu() for key, value in target.items()} for target in targets]

    thresholds = [float(t) for t in iou_thresholds]
    # AP50 is always reported; evaluate 0.5 as an extra threshold when the caller's list lacks it.
    evaluated = thresholds if 0.5 in thresholds else [*thresholds, 0.5]
    per_class = torch.tensor([_class_aps(predictions, targets, int(c), evaluated) for c in classes])
    per_threshold = per_class.mean(dim=0)
    return {
        "ap": per_threshold[: len(thresholds)].mean().item(),
        "ap50": per_threshold[evaluated.index(0.5)].item(),
    }
