"""Drop-in HungarianMatcher: one fused cost kernel and one batched solver launch for all decoder layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from e2evlp.nn.targets import PaddedTargets, pad_targets
from e2evlp.ops.assignment import linear_sum_assignment, status_message
from e2evlp.ops.boxes import CLASS_COSTS, matching_cost


@dataclass
class Matching:
    """One decoder layer's matched (query, target) pairs in fixed-shape slots, so that nothing downstream
    needs the host: slot k of image b pairs query ``src_idx[b, k]`` with target ``tgt_idx[b, k]`` where
    ``valid[b, k]``; valid slots come first and their queries ascend, as in DETR's index lists."""

    src_idx: torch.Tensor  # [B, K] query of each slot, K = min(Q, T)
    tgt_idx: torch.Tensor  # [B, K] target of each slot, 0 where not valid
    valid: torch.Tensor  # [B, K] bool
    query_target: torch.Tensor  # [B, Q] the target of each query, -1 for "no object"

    @classmethod
    def from_assignment(cls, assignment: torch.Tensor, num_slots: int) -> Matching:
        """From the solver's [B, Q] assignment (-1 = unassigned) against [B, num_slots] padded targets."""
        matched = assignment >= 0
        order = torch.sort((~matched).to(torch.uint8), dim=1, stable=True).indices  # [B, Q] matched queries first
        src = order[:, : min(assignment.shape[1], num_slots)]  # [B, K]
        tgt = assignment.gather(1, src)
        return cls(src, tgt.clamp(min=0), tgt >= 0, assignment)

    @classmethod
    def from_pairs(cls, pairs, num_queries: int, num_slots: int, device: torch.device) -> Matching:
        """From DETR's per-image (index_i, index_j) list, e.g. the output of DETR's own matcher."""
        assignment = torch.full((len(pairs), num_queries), -1, dtype=torch.int64)
        for b, (i, j) in enumerate(pairs):
            assignment[b, torch.as_tensor(i, dtype=torch.int64).cpu()] = torch.as_tensor(j, dtype=torch.int64).cpu()
        return cls.from_assignment(assignment.to(device), num_slots)

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """DETR's format: one (index_i, index_j) pair of int64 tensors per image (one host read)."""
        counts = self.valid.sum(1).tolist()
        return [(self.src_idx[b, :n], self.tgt_idx[b, :n]) for b, n in enumerate(counts)]


class HungarianMatcher(nn.Module):
    """DETR's HungarianMatcher (same constructor, forward(outputs, targets), same total cost), built from
    e2evlp.ops.matching_cost and the batched exact solver.

    Costs are per image ([B, Q, T], never DETR's cross-batch [B·Q, ΣT]); float16/bfloat16 inputs are
    matched in float32. ``match_layers`` matches several decoder layers (``aux_outputs``) in one cost
    launch and one solver launch and reads nothing back to the host, so it traces into one graph;
    ``forward`` adds DETR's index lists and the check of the solver's status (one host read).
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
    def forward(self, outputs: dict, targets: list[dict] | PaddedTargets) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """outputs: pred_logits [B, Q, C+1], pred_boxes [B, Q, 4] (normalized cxcywh); targets: one dict
        per image with labels [T_i] and boxes [T_i, 4]. Returns [(index_i, index_j)] per image."""
        matchings, status = self.match_layers([outputs], targets)
        check_status(status, [outputs], targets)
        return matchings[0].pairs()

    @torch.no_grad()
    def match_layers(self, layers: list[dict], targets: list[dict] | PaddedTargets,
                     ) -> tuple[list[Matching], torch.Tensor]:
        """Matches every decoder layer's outputs against the same targets at once. Returns one Matching
        per layer and the solver's int32 status [L, B] (0 = solved; a refused problem has no pairs)."""
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
        padded = pad_targets(targets, first.device)
        if padded.labels.shape[0] != B:
            raise ValueError(f"got {padded.labels.shape[0]} target dicts for a batch of {B} images")
        L, T = len(layers), padded.labels.shape[1]

        logits = _stack_layers(layers, "pred_logits")  # [L·B, Q, C+1]
        boxes = _stack_layers(layers, "pred_boxes")  # [L·B, Q, 4]
        counts, labels, tgt_boxes = (_tile(t, L) for t in (padded.num_targets, padded.labels, padded.boxes))
        cost = matching_cost(logits, boxes, labels, tgt_boxes, counts,
                             w_class=self.cost_class, w_bbox=self.cost_bbox, w_giou=self.cost_giou,
                             class_cost=self.class_cost, focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma,
                             validate=False)  # [L·B, Q, T]
        assignment, status = linear_sum_assignment(cost, num_cols=counts, return_status=True)  # [L·B, Q], [L·B]
        matchings = [Matching.from_assignment(part, T) for part in assignment.split(B)]
        return matchings, status.view(L, B)


def check_status(status: torch.Tensor, layers: list[dict], targets: list[dict] | PaddedTargets) -> None:
    """ValueError for a problem the solver refused, in terms of the inputs (one host read)."""
    if bool(status.any()):
        Q = layers[0]["pred_logits"].shape[1]
        padded = pad_targets(targets, layers[0]["pred_logits"].device)
        layer, image = (int(v) for v in torch.nonzero(status)[0])
        reason = status_message(int(status[layer, image]), Q, padded.labels.shape[1])
        raise ValueError(_diagnose(layers, padded) or f"{reason} (decoder layer {layer}, image {image})")


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
    valid = padded.valid
    classes = layers[0]["pred_logits"].shape[-1]
    if bool(((padded.labels < 0) | (padded.labels >= classes))[valid].any()):
        return f"a target label is outside [0, {classes}) (pred_logits has {classes} classes)"
    if not bool(torch.isfinite(padded.boxes).all()):
        return "target boxes contain NaN or inf"
    return None
