"""Drop-in HungarianMatcher: one fused cost kernel and one batched solver launch for all decoder layers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from e2evlp.nn.targets import PaddedTargets, host_to_device, pad_targets
from e2evlp.ops.assignment import linear_sum_assignment
from e2evlp.ops.boxes import CLASS_COSTS, matching_cost


@dataclass
class Matching:
    """Matched (query, target) pairs of one decoder layer, flat over the batch; queries ascend per image."""

    batch_idx: torch.Tensor  # [K] image of each pair
    src_idx: torch.Tensor  # [K] query index
    tgt_idx: torch.Tensor  # [K] target index within its image
    sizes: list[int]  # pairs per image, on the host

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """DETR's format: one (index_i, index_j) pair of int64 tensors per image."""
        return list(zip(self.src_idx.split(self.sizes), self.tgt_idx.split(self.sizes)))

    @classmethod
    def from_pairs(cls, pairs, device: torch.device) -> Matching:
        """From DETR's per-image (index_i, index_j) list, e.g. the output of DETR's own matcher."""
        sizes = [len(i) for i, _ in pairs]
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        src = torch.cat([torch.as_tensor(i, dtype=torch.int64) for i, _ in pairs]).to(device) if pairs else empty
        tgt = torch.cat([torch.as_tensor(j, dtype=torch.int64) for _, j in pairs]).to(device) if pairs else empty
        batch = host_to_device(np.repeat(np.arange(len(pairs), dtype=np.int64), sizes), device)
        return cls(batch, src, tgt, sizes)


class HungarianMatcher(nn.Module):
    """DETR's HungarianMatcher (same constructor, forward(outputs, targets), same total cost), built from
    e2evlp.ops.matching_cost and the batched exact solver.

    Costs are per image ([B, Q, T_max], never DETR's cross-batch [B·Q, ΣT]); float16/bfloat16 inputs
    are matched in float32. ``match_layers`` matches several decoder layers (``aux_outputs``) in one
    cost launch and one solver launch. On CUDA the only host sync is the solver's status check, and
    the returned indices stay on the predictions' device.
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1, *,
                 class_cost: str = "softmax", focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("cost_class, cost_bbox and cost_giou can't all be 0")
        if class_cost not in CLASS_COSTS:
            raise ValueError(f"class_cost must be one of {CLASS_COSTS}, got {class_cost!r}")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.class_cost, self.focal_alpha, self.focal_gamma = class_cost, focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """outputs: pred_logits [B, Q, C+1], pred_boxes [B, Q, 4] (normalized cxcywh); targets: one dict
        per image with labels [T_i] and boxes [T_i, 4]. Returns [(index_i, index_j)] per image."""
        return self.match_layers([outputs], targets)[0].pairs()

    @torch.no_grad()
    def match_layers(self, layers: list[dict], targets: list[dict],
                     padded: PaddedTargets | None = None) -> list[Matching]:
        """Matches every decoder layer's outputs against the same targets at once."""
        for i, layer in enumerate(layers):
            if "pred_logits" not in layer or "pred_boxes" not in layer:
                raise KeyError(f"decoder layer {i} outputs need 'pred_logits' and 'pred_boxes'")
        first = layers[0]["pred_logits"]
        B, Q = first.shape[:2]
        for i, layer in enumerate(layers):
            if layer["pred_logits"].shape != first.shape or layer["pred_boxes"].shape != (B, Q, 4):
                raise ValueError(f"decoder layer {i} has pred_logits {tuple(layer['pred_logits'].shape)} and "
                                 f"pred_boxes {tuple(layer['pred_boxes'].shape)}; expected {tuple(first.shape)} "
                                 f"and {(B, Q, 4)} like layer 0")
        if len(targets) != B:
            raise ValueError(f"got {len(targets)} target dicts for a batch of {B} images")
        device, L = first.device, len(layers)
        padded = padded if padded is not None else pad_targets(targets, device)

        logits = _stack_layers(layers, "pred_logits")  # [L·B, Q, C+1]
        boxes = _stack_layers(layers, "pred_boxes")  # [L·B, Q, 4]
        counts, labels, tgt_boxes = (_tile(t, L) for t in (padded.num_targets, padded.labels, padded.boxes))
        cost = matching_cost(logits, boxes, labels, tgt_boxes, counts,
                             w_class=self.cost_class, w_bbox=self.cost_bbox, w_giou=self.cost_giou,
                             class_cost=self.class_cost, focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma,
                             validate=False)  # [L·B, Q, T]
        try:
            assignment = linear_sum_assignment(cost, num_cols=counts)  # the one host sync: solver status
        except ValueError as exc:
            raise ValueError(_diagnose(layers, padded) or str(exc)) from exc

        # Every image gets exactly min(Q, T_b) pairs (finite costs): the split needs no sync.
        per_image = [min(Q, n) for n in padded.sizes]
        per_item = np.tile(np.asarray(per_image, dtype=np.int64), L)
        order = torch.sort((assignment < 0).to(torch.uint8), dim=1, stable=True).indices  # assigned rows first
        matched_cols = assignment.gather(1, order)
        starts = np.repeat(np.cumsum(per_item) - per_item, per_item)
        slots = np.repeat(np.arange(L * B, dtype=np.int64) * Q, per_item) + np.arange(per_item.sum()) - starts
        index = host_to_device(slots, device)
        src, tgt = order.flatten()[index], matched_cols.flatten()[index]
        batch = host_to_device(np.repeat(np.arange(B, dtype=np.int64), per_image), device)
        K = sum(per_image)
        return [Matching(batch, src[i * K:(i + 1) * K], tgt[i * K:(i + 1) * K], per_image) for i in range(L)]


def _stack_layers(layers: list[dict], key: str) -> torch.Tensor:
    """The layers' `key` tensors one after another along the batch (no copy for a single layer)."""
    return layers[0][key] if len(layers) == 1 else torch.cat([layer[key] for layer in layers])


def _tile(t: torch.Tensor, times: int) -> torch.Tensor:
    """`times` copies of t one after another along dim 0 (t itself for one)."""
    return t if times == 1 else t.repeat(times, *([1] * (t.dim() - 1)))


def _diagnose(layers: list[dict], padded: PaddedTargets) -> str | None:
    """Why the solver refused a cost matrix, in terms of the inputs (runs only after a failure)."""
    for i, layer in enumerate(layers):
        for key in ("pred_logits", "pred_boxes"):
            if not bool(torch.isfinite(layer[key]).all()):
                return f"{key} of decoder layer {i} contains NaN or inf"
    valid = torch.arange(padded.labels.shape[1], device=padded.labels.device)[None, :] < padded.num_targets[:, None]
    classes = layers[0]["pred_logits"].shape[-1]
    if bool(((padded.labels < 0) | (padded.labels >= classes))[valid].any()):
        return f"a target label is outside [0, {classes}) (pred_logits has {classes} classes)"
    if not bool(torch.isfinite(padded.boxes).all()):
        return "target boxes contain NaN or inf"
    return None
