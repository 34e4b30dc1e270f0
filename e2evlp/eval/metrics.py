"""VQA accuracy, classification accuracy and image-text retrieval recall@K (answer normalization: e2evlp.answers)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

# normalize_answer and vqa_soft_score stay importable from here (and from e2evlp.eval), where they used to live.
from e2evlp.answers import normalize_answer as normalize_answer
from e2evlp.answers import strip_punctuation
from e2evlp.answers import vqa_soft_score as vqa_soft_score


def _question_accuracy(prediction: str, answers: list[str]) -> float:
    # Leave-one-out over annotators: removing answer i leaves `matches - (answer i matches)` matches.
    matches = sum(answer == prediction for answer in answers)
    return sum(min(1.0, (matches - (answer == prediction)) / 3) for answer in answers) / len(answers)


def vqa_accuracy(predictions: Mapping[Hashable, str], annotations: Mapping[Hashable, Sequence[str]]) -> float:
    """Official VQA accuracy in [0, 1] (vqaEval.py's rule), averaged over the annotated questions (all must be
    predicted)."""
    if not annotations:
        raise ValueError("annotations is empty")
    missing = [qid for qid in annotations if qid not in predictions]
    if missing:
        raise ValueError(f"predictions lacks {len(missing)} annotated question(s), e.g. {missing[:3]}")
    extra = [qid for qid in predictions if qid not in annotations]
    if extra:
        raise ValueError(f"predictions has {len(extra)} question(s) without annotations, e.g. {extra[:3]}")
    total = 0.0
    for qid, answers in annotations.items():
        if len(answers) < 2:
            raise ValueError(f"annotations[{qid!r}] needs at least 2 answers for leave-one-out, got {len(answers)}")
        # As the official vqaEval.py: the prediction is normalized fully, the annotators' answers only for
        # punctuation and only when they disagree (VQA v2's answers come normalized already), so "2" scores 0
        # against ten "two" and 0.6 against eight "two" and two "2".
        if len(set(answers)) > 1:
            answers = [strip_punctuation(answer) for answer in answers]
        total += _question_accuracy(normalize_answer(predictions[qid]), list(answers))
    return total / len(annotations)


def _fraction(hits: torch.Tensor) -> float:
    """The share of True in `hits`, divided in Python's float64: a float32 mean would print 1/25 as 0.03999999910."""
    return int(hits.sum()) / hits.numel()


def classification_accuracy(pred: torch.Tensor | Sequence, labels: torch.Tensor | Sequence) -> float:
    """Fraction of correct predictions; `pred` holds class ids [N] or scores [N, C] (argmax taken)."""
    pred, labels = torch.as_tensor(pred), torch.as_tensor(labels)
    if labels.numel() == 0:
        raise ValueError("labels is empty")
    if pred.dim() == labels.dim() + 1:
        pred = pred.argmax(dim=-1)
    if pred.shape != labels.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but labels has {tuple(labels.shape)}")
    return _fraction(pred == labels)


def _recalls(ranks: torch.Tensor, ks: Sequence[int]) -> list[float]:
    return [100.0 * _fraction(ranks < k) for k in ks]


def recall_at_k(scores: torch.Tensor, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image-text retrieval recall@K in percent, both directions, as UNITER / ALBEF report it.

    scores: [num_texts, num_images] similarities; text_to_image[t] is the ground-truth image of text t.
    Keys: tr_r{k} (image -> text: any of the image's texts in its top K), ir_r{k} (text -> image), rsum.
    A rank counts the negatives scoring at least as high as the positive, so ties never flatter a model.
    """
    if scores.numel() == 0:
        raise ValueError("scores is empty")
    num_texts, num_images = scores.shape
    gt = torch.as_tensor(text_to_image, dtype=torch.long, device=scores.device)
    if gt.shape != (num_texts,):
        raise ValueError(f"text_to_image has {gt.numel()} entries for {num_texts} texts")
    if gt.min() < 0 or gt.max() >= num_images:
        raise ValueError(f"text_to_image has image ids outside [0, {num_images})")
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(num_texts, device=scores.device), gt] = True
    if not positive.any(dim=0).all():
        raise ValueError("text_to_image leaves some images without a text; image -> text recall is undefined")
    scores = scores.float()
    neg_inf = torch.tensor(float("-inf"), device=scores.device)
    text_pos = scores.gather(1, gt[:, None])
    text_ranks = ((scores >= text_pos) & ~positive).sum(dim=1)
    image_pos = torch.where(positive, scores, neg_inf).amax(dim=0, keepdim=True)
    image_ranks = ((scores >= image_pos) & ~positive).sum(dim=0)
    result = {f"tr_r{k}": r for k, r in zip(ks, _recalls(image_ranks, ks))}
    result |= {f"ir_r{k}": r for k, r in zip(ks, _recalls(text_ranks, ks))}
    result["rsum"] = sum(result.values())
    return result
