"""Reference twins of the matcher and set criterion: DETR's formulation, scipy on the host, per-image Python."""

from __future__ import annotations

import scipy.optimize
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from e2evlp.reference.boxes import box_losses, cost_block


class HungarianMatcher(nn.Module):
    """DETR's matcher. With per_image_blocks=False (DETR) the cost is one [B·Q, ΣT] matrix over the whole
    batch, cut into per-image blocks on the host; with True each image's [Q, T_i] block is built alone.
    Returns DETR's list of (index_i, index_j) int64 CPU tensors."""

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1, *,
                 class_cost: str = "softmax", focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 per_image_blocks: bool = False):
        super().__init__()
        self.weights = dict(w_class=cost_class, w_bbox=cost_bbox, w_giou=cost_giou, class_cost=class_cost,
                            focal_alpha=focal_alpha, focal_gamma=focal_gamma)
        self.per_image_blocks = per_image_blocks

    @torch.no_grad()
    def forward(self, outputs, targets):
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        B, Q = logits.shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        if self.per_image_blocks:
            blocks = [cost_block(logits[b], boxes[b], t["labels"], t["boxes"], **self.weights).cpu()
                      for b, t in enumerate(targets)]
        else:
            labels = torch.cat([t["labels"] for t in targets])
            tgt_boxes = torch.cat([t["boxes"] for t in targets])
            cost = cost_block(logits.flatten(0, 1), boxes.flatten(0, 1), labels, tgt_boxes, **self.weights)
            cost = cost.view(B, Q, -1).cpu()
            blocks = [part[b] for b, part in enumerate(cost.split(sizes, -1))]
        pairs = [scipy.optimize.linear_sum_assignment(block.float().numpy()) for block in blocks]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in pairs]


class SetCriterion(nn.Module):
    """DETR's SetCriterion (labels with eos_coef, boxes L1 + GIoU, cardinality, aux_outputs) plus
    E2E-VLP's attribute loss, written the way DETR writes it: per-image gathers, `.item()` on num_boxes."""

    def __init__(self, num_classes, matcher, weight_dict, eos_coef, losses, num_attributes=None):
        super().__init__()
        self.num_classes, self.num_attributes = num_classes, num_attributes
        self.matcher, self.weight_dict, self.eos_coef, self.losses = matcher, weight_dict, eos_coef, losses
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    @staticmethod
    def _src_index(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        return batch_idx, torch.cat([src for src, _ in indices])

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        logits = outputs["pred_logits"]
        batch_idx, src_idx = self._src_index(indices)
        matched = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = matched
        losses = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}
        if log:
            if matched.numel() == 0:
                accuracy = torch.zeros([], device=logits.device)
            else:
                accuracy = (logits[batch_idx, src_idx].argmax(-1) == matched).float().sum() * (100.0 / matched.numel())
            losses["class_error"] = 100 - accuracy
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes):
        logits = outputs["pred_logits"]
        lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted.float(), lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        batch_idx, src_idx = self._src_index(indices)
        src_boxes = outputs["pred_boxes"][batch_idx, src_idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src_boxes.device)
        l1, giou = box_losses(src_boxes, target_boxes)
        return {"loss_bbox": l1.sum() / num_boxes, "loss_giou": giou.sum() / num_boxes}

    def loss_attributes(self, outputs, targets, indices, num_boxes):
        batch_idx, src_idx = self._src_index(indices)
        logits = outputs["pred_attributes"][batch_idx, src_idx]
        attrs = torch.cat([t["attributes"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        valid = int((attrs >= 0).sum())
        if valid == 0:
            return {"loss_attr": logits.sum() * 0.0}
        return {"loss_attr": F.cross_entropy(logits, attrs, ignore_index=-1, reduction="sum") / valid}

    def get_loss(self, loss, outputs, targets, indices, num_boxes, **kwargs):
        table = {"labels": self.loss_labels, "cardinality": self.loss_cardinality, "boxes": self.loss_boxes,
                 "attributes": self.loss_attributes}
        return table[loss](outputs, targets, indices, num_boxes, **kwargs)

    def forward(self, outputs, targets):
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(main, targets)
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))],
                                    device=outputs["pred_logits"].device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            world = dist.get_world_size()
        num_boxes = torch.clamp(num_boxes / world, min=1).item()
        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, main, targets, indices, num_boxes))
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            indices = self.matcher(aux, targets)
            for loss in self.losses:
                extra = {"log": False} if loss == "labels" else {}
                losses.update({f"{k}_{i}": v for k, v in self.get_loss(loss, aux, targets, indices, num_boxes,
                                                                       **extra).items()})
        return losses

    def weighted_total(self, losses):
        """DETR's training objective: the losses named in weight_dict, each times its weight, summed."""
        total = 0
        for name, weight in self.weight_dict.items():
            if name in losses:
                total = total + losses[name] * weight
        return total
