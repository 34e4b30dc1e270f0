"""E2EVLPForPretraining: masked LM, image-text matching, detection with attributes, and captioning."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from e2evlp import nn as enn
from e2evlp import reference
from e2evlp.models.captioning import teacher_forced_captions
from e2evlp.models.config import E2EVLPConfig
from e2evlp.models.heads import LMHead
from e2evlp.models.losses import token_cross_entropy
from e2evlp.models.model import E2EVLPModel, EncoderOutput, ImageTokens, init_bert_weights
from e2evlp.models.pretrained import PretrainedModule

DETECTION_LOSSES = ["labels", "boxes", "cardinality", "attributes"]


@dataclass
class PretrainingOutput:
    loss: torch.Tensor | None  # the weighted sum of `losses`
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # mlm, itm, detection, caption (those run)
    detection_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # SetCriterion's, unweighted
    detection_outputs: dict | None = None
    # Matching problems the solver refused (non-finite or infeasible costs), a float tensor; the Trainer reads it
    # with the loss, so a compiled step that skips the criterion's host-side checks still stops on them.
    matching_failures: torch.Tensor | None = None


def detection_criterion(config: E2EVLPConfig) -> nn.Module:
    """SetCriterion with attributes; e2evlp's fused one, or DETR's (reference) for kernels="reference"."""
    per_layer = {"loss_ce": config.class_loss_coef, "loss_bbox": config.bbox_loss_coef,
                 "loss_giou": config.giou_loss_coef, "loss_attr": config.attribute_loss_coef}
    weight_dict = dict(per_layer)
    for i in range(config.num_decoder_layers - 1):
        weight_dict.update({f"{k}_{i}": w for k, w in per_layer.items()})
    costs = dict(cost_class=config.match_cost_class, cost_bbox=config.match_cost_bbox,
                 cost_giou=config.match_cost_giou)
    module = enn if config.kernels == "fused" else reference
    return module.SetCriterion(config.num_classes, module.HungarianMatcher(**costs), weight_dict, config.eos_coef,
                               DETECTION_LOSSES, num_attributes=config.num_attributes)


class E2EVLPForPretraining(PretrainedModule):
    """The four pre-training tasks on one shared E2EVLPModel (``.model``).

    * ``mlm``: masked tokens (already masked in ``input_ids`` by the data; ``mlm_labels`` holds the
      originals, -100 elsewhere) predicted from the joint encoding of image and text;
    * ``itm``: ``itm_labels`` (1 = the text describes the image) from the pooled [CLS] state;
    * ``detection``: the decoder's object queries against ``targets`` (DETR's dicts: labels, boxes
      cxcywh, attributes with -1 = none), Hungarian matching, CE + L1 + GIoU + attribute losses on
      every decoder layer, weighted by the config's coefficients;
    * ``caption``: next-token prediction of ``caption_ids`` by the decoder over the image encoded
      *alone*, so the caption never reaches the decoder through the encoder.
    Each task runs only when its inputs are given; ``loss`` is the config-weighted sum.
    """

    task_heads = ("mlm_head", "itm_head", "caption_head")
    config_buffers = ("criterion.empty_weight",)  # DETR's class weights: 1 per class, eos_coef for "no object"

    def __init__(self, config: E2EVLPConfig):
        super().__init__()
        self.config = config
        self.model = E2EVLPModel(config)
        words = self.model.embeddings.word_embeddings
        self.mlm_head = LMHead(config.hidden_size, words, config.layer_norm_eps)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.caption_head = LMHead(config.hidden_size, words, config.layer_norm_eps)
        init_bert_weights(self.itm_head, config.initializer_range)
        self.criterion = detection_criterion(config)

    def forward(self, pixel_values=None, pixel_mask=None, input_ids=None, attention_mask=None, mlm_labels=None,
                itm_labels=None, targets=None, caption_ids=None, caption_mask=None,
                token_type_ids=None) -> PretrainingOutput:
        """The losses of the tasks whose inputs are given, from one pass of the backbone."""
        joint_tasks = mlm_labels is not None or itm_labels is not None or targets is not None
        if caption_ids is not None and pixel_values is None:
            raise ValueError("the caption task needs pixel_values")
        out = PretrainingOutput(loss=None)
        image = None
        if pixel_values is not None and (joint_tasks or caption_ids is not None):
            # The backbone runs once: the joint encoding and captioning's image-only encoding share its tokens.
            image = self.model.embed_image(pixel_values, pixel_mask)
        if joint_tasks:
            joint = self._encode_joint(input_ids, attention_mask, token_type_ids, image, mlm_labels)
            if mlm_labels is not None:
                out.losses["mlm"] = self._mlm_loss(joint, input_ids, mlm_labels)
            if itm_labels is not None:
                out.losses["itm"] = self._itm_loss(joint, itm_labels)
            if targets is not None:
                out.detection_outputs, out.detection_losses = self._detection_losses(joint, targets)
                out.matching_failures = out.detection_losses.pop("matching_failures", None)
                out.losses["detection"] = self.criterion.weighted_total(out.detection_losses)
        if caption_ids is not None:
            out.losses["caption"] = self._caption_loss(image, caption_ids, caption_mask)
        if out.losses:
            out.loss = enn.weighted_total(out.losses, self._task_weights())
        return out

    def _encode_joint(self, input_ids, attention_mask, token_type_ids, image: ImageTokens | None,
                      mlm_labels) -> EncoderOutput:
        """Text and image through the encoder together: the input of MLM, ITM and detection."""
        if mlm_labels is not None and input_ids is None:
            raise ValueError("mlm_labels need input_ids")
        return self.model.encode(input_ids, attention_mask, token_type_ids=token_type_ids, image=image)

    def _mlm_loss(self, joint: EncoderOutput, input_ids, mlm_labels) -> torch.Tensor:
        """Cross-entropy of the masked tokens' predictions from their joint states."""
        if mlm_labels.shape != input_ids.shape:
            raise ValueError(f"mlm_labels must match input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(mlm_labels.shape)}")
        text = joint.hidden[:, : joint.num_text]  # [B, Lt, C]
        return token_cross_entropy(self.mlm_head(text), mlm_labels)

    def _itm_loss(self, joint: EncoderOutput, itm_labels) -> torch.Tensor:
        """Cross-entropy of the match / no-match prediction from the pooled [CLS] state."""
        logits = self.itm_head(self.model.pooler(joint.hidden))  # [B, 2]
        return F.cross_entropy(logits.float(), itm_labels)

    def _detection_losses(self, joint: EncoderOutput, targets: list[dict] | enn.PaddedTargets
                          ) -> tuple[dict, dict[str, torch.Tensor]]:
        """The object queries' predictions over the joint encoding, and the criterion's unweighted losses."""
        if len(targets) != joint.hidden.shape[0]:
            raise ValueError(f"got {len(targets)} target dicts for {joint.hidden.shape[0]} images")
        if isinstance(targets, enn.PaddedTargets) and not isinstance(self.criterion, enn.SetCriterion):
            targets = targets.to_list()  # DETR's criterion (kernels="reference") takes its lists
        outputs = self.model.detect(joint)
        return outputs, self.criterion(outputs, targets)

    def _caption_loss(self, image: ImageTokens, caption_ids, caption_mask) -> torch.Tensor:
        """Teacher-forced captioning over the image encoded alone, so no caption text reaches the decoder."""
        image_only = self.model.encode(image=image)
        return teacher_forced_captions(self.model, self.caption_head, image_only, caption_ids, caption_mask).loss

    def _task_weights(self) -> dict[str, float]:
        """The config's weight of each task's loss in ``loss``."""
        config = self.config
        return {"mlm": config.mlm_weight, "itm": config.itm_weight, "detection": config.detection_weight,
                "caption": config.caption_weight}
