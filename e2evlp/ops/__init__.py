"""Functional API of e2evlp's fast ops (compiled extension and Triton kernels), dispatched by device."""

from e2evlp.ops.assignment import assignment_to_indices, linear_sum_assignment
from e2evlp.ops.attention import attention, attention_varlen
from e2evlp.ops.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_losses,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    giou_loss,
    matching_cost,
    validate_boxes,
)
from e2evlp.ops.dispatch import attention_backend

__all__ = [
    "assignment_to_indices",
    "attention",
    "attention_backend",
    "attention_varlen",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_losses",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "giou_loss",
    "linear_sum_assignment",
    "matching_cost",
    "validate_boxes",
]
