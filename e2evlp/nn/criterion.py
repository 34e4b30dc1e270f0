"""Drop-in SetCriterion: DETR's set losses plus E2E-VLP's attribute loss, all layers matched at once, no host sync."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from e2evlp.nn.matcher import Matching, check_status
from e2evlp.nn.targets import PaddedTargets, pad_targets, validate_targets
from e2evlp.ops.boxes import box_losses

LOSSES = ("labels", "cardinality", "boxes", "attributes")


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Sum of losses[k] * weights[k] over the keys of `weights` that `losses` has (DETR's weight_dict sum)."""
    return sum(losses[k] * w for k, w in weights.items() if k in losses)


class SetCriterion(nn.Module):
    """DETR's SetCriterion with DETR's constructor and forward(outputs, targets) -> dict of losses.

    Losses: ``labels`` (``loss_ce`` with ``eos_coef`` on the no-object class, and ``class_error`` on the
    last layer), ``cardinality`` (``cardinality_error``), ``boxes`` (``loss_bbox``, ``loss_giou`` from the
    fused e2evlp.ops.box_losses), and E2E-VLP's ``attributes`` (``loss_attr``: cross-entropy over
    ``num_attributes`` classes on matched boxes; a target attribute of -1 is ignored; the mean is over
    the boxes that have one). Auxiliary decoder layers (``outputs["aux_outputs"]``) add the same losses
    with suffixes ``_0``, ``_1``, ... (``loss_attr_i`` where that layer predicts attributes).
    ``num_boxes`` is all-reduced under torch.distributed and clamped to ≥ 1. ``matching_failures`` counts
    the (layer, image) problems the solver refused (non-finite predictions, labels outside the classes).

    Targets are DETR's list of dicts or PaddedTargets (the collator's form, bucketed so that a compiled
    step keeps one shape). With e2evlp's HungarianMatcher all layers are matched in one go and every loss
    works on fixed-shape slots: nothing reads back to the host, and the whole criterion traces into one
    graph. ``validate`` (None: on in eager, off while compiling) checks the target boxes (ValueError naming
    ``targets[i]['boxes']`` for NaN or a negative width or height; on the CPU only, unless True) and raises
    on a refused matching: each check is a host read. Off, a refused problem gets no pairs and shows in
    ``matching_failures``, which the Trainer checks in its one read per step. Any DETR-style matcher (a
    callable returning per-image index pairs) works too, in eager mode.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: dict[str, float], eos_coef: float,
                 losses: list[str], num_attributes: int | None = None, validate: bool | None = None):
        super().__init__()
        unknown = [name for name in losses if name not in LOSSES]
        if unknown:
            raise ValueError(f"unknown losses {unknown}; choose from {LOSSES}")
        if "attributes" in losses and not num_attributes:
            raise ValueError("the 'attributes' loss needs num_attributes")
        self.num_classes, self.num_attributes = num_classes, num_attributes
        self.matcher, self.weight_dict, self.eos_coef, self.losses = matcher, weight_dict, eos_coef, list(losses)
        self.validate = validate
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs, padded: PaddedTargets, m: Matching, num_boxes, log=True):
        logits = outputs["pred_logits"]  # [B, Q, C+1]
        matched = m.query_target >= 0  # [B, Q]
        labels = padded.labels.gather(1, m.query_target.clamp(min=0))  # [B, Q]
        target_classes = torch.where(matched, labels, self.num_classes)
        weight = self.empty_weight.to(logits.dtype)
        losses = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, weight)}
        if log:
            with torch.no_grad():
                hits = ((logits.argmax(-1) == labels) & matched).sum()
                accuracy = hits.float() * 100.0 / matched.sum().clamp(min=1)
                losses["class_error"] = 100 - accuracy
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, padded: PaddedTargets, m: Matching, num_boxes):
        logits = outputs["pred_logits"]
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)  # [B] non-empty predictions
        return {"cardinality_error": F.l1_loss(predicted.float(), padded.num_targets.float())}

    def loss_boxes(self, outputs, padded: PaddedTargets, m: Matching, num_boxes):
        src = _gather_slots(outputs["pred_boxes"], m.src_idx)  # [B, K, 4]
        target = _gather_slots(padded.boxes, m.tgt_idx)
        l1, giou = box_losses(src.flatten(0, 1), target.flatten(0, 1).to(src.dtype), validate=False)  # [B·K]
        valid = m.valid.flatten()
        return {"loss_bbox": l1.where(valid, 0).sum() / num_boxes, "loss_giou": giou.where(valid, 0).sum() / num_boxes}

    def loss_attributes(self, outputs, padded: PaddedTargets, m: Matching, num_boxes):
        if padded.attributes is None:
            raise KeyError("the 'attributes' loss needs an 'attributes' entry in every target dict")
        logits = _gather_slots(outputs["pred_attributes"], m.src_idx)  # [B, K, A]
        target = padded.attributes.gather(1, m.tgt_idx).where(m.valid, -1)  # [B, K], -1 = none
        total = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-1, reduction="sum")
        return {"loss_attr": total / (target >= 0).sum().clamp(min=1)}

    def get_loss(self, loss: str, outputs, padded: PaddedTargets, m: Matching, num_boxes, **kwargs):
        table = {"labels": self.loss_labels, "cardinality": self.loss_cardinality, "boxes": self.loss_boxes,
                 "attributes": self.loss_attributes}
        return table[loss](outputs, padded, m, num_boxes, **kwargs)

    def match(self, layers: list[dict], padded: PaddedTargets) -> tuple[list[Matching], torch.Tensor]:
        """Each layer's Matching and the solver's status [L, B] (zeros for a DETR-style matcher, which raises)."""
        if hasattr(self.matcher, "match_layers"):
            return self.matcher.match_layers(layers, padded)
        B, Q = layers[0]["pred_logits"].shape[:2]
        device, targets = layers[0]["pred_logits"].device, padded.to_list()
        matchings = [Matching.from_pairs(self.matcher(layer, targets), Q, padded.labels.shape[1], device)
                     for layer in layers]
        return matchings, torch.zeros(len(layers), B, dtype=torch.int32, device=device)

    def forward(self, outputs: dict, targets: list[dict] | PaddedTargets) -> dict[str, torch.Tensor]:
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        layers = [main] + list(outputs.get("aux_outputs", []))
        device = main["pred_logits"].device
        padded = pad_targets(targets, device)
        validate = not torch.compiler.is_compiling() if self.validate is None else self.validate
        if validate and (device.type == "cpu" or self.validate):
            validate_targets(padded)
        matchings, status = self.match(layers, padded)
        if validate:
            check_status(status, layers, padded)
        num_boxes = padded.num_targets.sum().float()
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            world = dist.get_world_size()
        num_boxes = torch.clamp(num_boxes / world, min=1)

        losses = {}
        for i, (layer, matching) in enumerate(zip(layers, matchings)):
            suffix = "" if i == 0 else f"_{i - 1}"
            for name in self.losses:
                if name == "attributes" and i > 0 and "pred_attributes" not in layer:
                    continue
                kwargs = {"log": i == 0} if name == "labels" else {}
                for key, value in self.get_loss(name, layer, padded, matching, num_boxes, **kwargs).items():
                    losses[key + suffix] = value
        losses["matching_failures"] = (status != 0).sum().float()
        return losses

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective: sum of losses[k] * weight_dict[k] over the keys weight_dict names."""
        return weighted_total(losses, self.weight_dict)


def _gather_slots(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[b, index[b, k]] for values [B, N, D] and index [B, K] -> [B, K, D]."""
    return values.gather(1, index[..., None].expand(-1, -1, values.shape[-1]))
