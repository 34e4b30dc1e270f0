"""Evaluation metrics: VQA accuracy, classification accuracy, BLEU / CIDEr-D, retrieval recall@K, detection AP."""

from e2evlp.answers import normalize_answer, vqa_soft_score
from e2evlp.eval.caption_metrics import bleu, cider, tokenize_caption
from e2evlp.eval.detection_metrics import COCO_IOU_THRESHOLDS, detection_ap
from e2evlp.eval.metrics import classification_accuracy, recall_at_k, vqa_accuracy

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "bleu",
    "cider",
    "classification_accuracy",
    "detection_ap",
    "normalize_answer",
    "recall_at_k",
    "tokenize_caption",
    "vqa_accuracy",
    "vqa_soft_score",
]
