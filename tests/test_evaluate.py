"""Evaluation loops on hand-checked cases: DETR post-processing, balanced ITM accuracy, VQA/NLVR2 scoring."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from e2evlp.eval.evaluate import detections_from_outputs, evaluate_nlvr2, evaluate_pretraining, evaluate_vqa


def test_detections_take_the_best_real_class_and_convert_boxes():
    logits = torch.tensor([[[2.0, 0.0, 5.0], [0.0, 3.0, 0.0]]])  # [1, Q=2, C+1=3]: class 0, class 1, no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    (found,) = detections_from_outputs({"pred_logits": logits, "pred_boxes": boxes})
    probs = logits.softmax(-1)[0]
    assert found["labels"].tolist() == [0, 1]  # the no-object class never wins, it only lowers the score
    assert torch.allclose(found["scores"], torch.stack([probs[0, 0], probs[1, 1]]))
    assert torch.allclose(found["boxes"], torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.5, 0.5, 1.0]]))


class _FixedPretraining(nn.Module):
    """Answers ITM with given logits and detects one box per image, exactly the target's."""

    def __init__(self, itm_logits: torch.Tensor, boxes: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.itm_logits, self.boxes = itm_logits, boxes
        self.model = SimpleNamespace(encode=self._encode, pooler=lambda hidden: hidden, detect=self._detect)

    def _encode(self, input_ids, attention_mask, pixel_values, pixel_mask):
        return SimpleNamespace(hidden=self.itm_logits)

    def itm_head(self, pooled):
        return pooled

    def _detect(self, joint):
        B = self.boxes.shape[0]
        logits = torch.tensor([5.0, 0.0, 0.0]).expand(B, 1, 3)  # class 0, confident
        return {"pred_logits": logits, "pred_boxes": self.boxes[:, None]}


def test_itm_accuracy_is_balanced_and_detection_uses_matched_pairs_only():
    itm_labels = torch.tensor([1, 1, 1, 0])
    always_match = torch.tensor([[0.0, 1.0]] * 4)  # right on 3 of 4 pairs, but blind to negatives
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 4)
    targets = [{"labels": torch.tensor([0]), "boxes": boxes[i:i + 1]} for i in range(4)]
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3),
             "pixel_values": torch.zeros(4, 3, 8, 8), "pixel_mask": torch.ones(4, 8, 8, dtype=torch.bool),
             "itm_labels": itm_labels, "targets": targets}
    metrics = evaluate_pretraining(_FixedPretraining(always_match, boxes), [batch])
    assert metrics["itm_acc"] == pytest.approx(0.5)
    assert metrics["det_ap50"] == pytest.approx(1.0) and metrics["det_ap"] == pytest.approx(1.0)


class _Classifier(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.logits = logits

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.logits)


def test_vqa_uses_the_official_formula_and_nlvr2_accuracy():
    batch = {"pixel_values": torch.zeros(2, 3, 4, 4), "input_ids": torch.zeros(2, 2, dtype=torch.long),
             "question_ids": [7, 8], "answers": [["yes"] * 2 + ["no"] * 8, ["2"] * 10]}
    result = evaluate_vqa(_Classifier(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])), [batch],
                          ["yes", "no", "2"])
    # "yes" matches 2 of 10 annotators: the official per-question score averages min(1, matches/3) over the
    # ten leave-one-out subsets: 8 subsets hold both "yes" answers (2/3), 2 hold one (1/3).
    assert result["predictions"] == {7: "yes", 8: "2"}
    assert result["vqa_acc"] == pytest.approx(((8 * 2 / 3 + 2 * 1 / 3) / 10 + 1.0) / 2)
    with pytest.raises(ValueError, match="question 9 has no answers"):
        evaluate_vqa(_Classifier(torch.zeros(1, 3)), [{**batch, "question_ids": [9], "answers": [None]}], ["a"] * 3)
    nlvr2 = {"pixel_values": torch.zeros(2, 2, 3, 4, 4), "input_ids": torch.zeros(2, 2, dtype=torch.long),
             "labels": torch.tensor([1, 0])}
    assert evaluate_nlvr2(_Classifier(torch.tensor([[0.0, 1.0], [0.0, 1.0]])), [nlvr2]) == {"nlvr2_acc": 0.5}
