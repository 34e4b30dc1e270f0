"""VQA accuracy and answer normalization, classification accuracy and image-text retrieval recall@K."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import torch

# Written without apostrophes by some annotators; every form with any subset of its apostrophes dropped
# maps back to it. Forms whose apostrophe-free spelling is an ordinary word (its, ill, well, were, shed,
# hell, lets, wed, id) are left out so that those words are never rewritten.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've "
    "shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're "
    "there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're "
    "what's what've when's where'd where's where've who'd who'd've who'll who're who's who've why'll "
    "why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've"
).split()


def _apostrophe_variants(word: str) -> set[str]:
    """Every spelling of `word` with some (possibly none) of its apostrophes removed."""
    parts = word.split("'")
    variants = set()
    for keep in itertools.product((True, False), repeat=len(parts) - 1):
        joined = parts[0]
        for part, kept in zip(parts[1:], keep):
            joined += ("'" if kept else "") + part
        variants.add(joined)
    return variants


_CONTRACTION_FIXES = {variant: word for word in _CONTRACTIONS for variant in _apostrophe_variants(word)}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period that does not start a decimal part ("2.5" keeps its period, "yes." loses it).
_PERIOD = re.compile(r"\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    # The VQA rule: a mark touching a space, or any mark in an answer holding a number like "1,000",
    # is deleted; otherwise it separates words ("black/white" -> "black white").
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalization: punctuation, lowercase, number words, articles, contractions."""
    text = _strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTION_FIXES.get(word, word) for word in words if word not in _ARTICLES)


def vqa_soft_score(answers: Sequence[str]) -> dict[str, float]:
    """Soft target per normalized answer: min(1, count / 3) over the annotators' answers."""
    counts = Counter(normalize_answer(answer) for answer in answers)
    return {answer: min(1.0, count / 3) for answer, count in counts.items()}


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
            answers = [_strip_punctuation(answer) for answer in answers]
        total += _question_accuracy(normalize_answer(predictions[qid]), list(answers))
    return total / len(annotations)


def classification_accuracy(pred: torch.Tensor | Sequence, labels: torch.Tensor | Sequence) -> float:
    """Fraction of correct predictions; `pred` holds class ids [N] or scores [N, C] (argmax taken)."""
    pred, labels = torch.as_tensor(pred), torch.as_tensor(labels)
    if labels.numel() == 0:
        raise ValueError("labels is empty")
    if pred.dim() == labels.dim() + 1:
        pred = pred.argmax(dim=-1)
    if pred.shape != labels.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but labels has {tuple(labels.shape)}")
    return (pred == labels).float().mean().item()


def _recalls(ranks: torch.Tensor, ks: Sequence[int]) -> list[float]:
    return [100.0 * (ranks < k).float().mean().item() for k in ks]


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
