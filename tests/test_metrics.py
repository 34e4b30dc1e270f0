"""Evaluation metrics on hand-computed cases: VQA accuracy, classification, BLEU / CIDEr-D, recall@K, AP."""

import math

import pytest
import torch

from e2evlp.eval import (
    bleu,
    cider,
    classification_accuracy,
    detection_ap,
    recall_at_k,
    tokenize_caption,
    vqa_accuracy,
    vqa_soft_score,
)

# ---------------------------------------------------------------- VQA


def test_vqa_accuracy_three_matches_after_normalization():
    # 3 of 10 annotators say "2"; the prediction "two" normalizes to "2". Leaving out one of the 7 other
    # answers keeps 3 matches: min(1, 3/3) = 1; leaving out one of the 3 matches keeps 2: 2/3.
    # (7 * 1 + 3 * 2/3) / 10 = (7 + 2) / 10 = 0.9.
    annotations = {1: ["2"] * 3 + ["3"] * 7}
    assert vqa_accuracy({1: "two"}, annotations) == pytest.approx(0.9)


def test_vqa_accuracy_averages_questions():
    # q1: all 10 agree -> 1. q2: one match; the 9 subsets that keep it give 1/3, the other 0 -> 9/30 = 0.3.
    # q3: no match -> 0. Mean: (1 + 0.3 + 0) / 3.
    annotations = {"q1": ["yes"] * 10, "q2": ["red"] + ["blue"] * 9, "q3": ["cat"] * 10}
    predictions = {"q1": "Yes", "q2": "red", "q3": "dog"}
    assert vqa_accuracy(predictions, annotations) == pytest.approx(1.3 / 3)


@pytest.mark.parametrize(("prediction", "answers", "expected"), [
    ("2", ["two"] * 10, 0.0),  # unanimous answers are compared as given
    ("yes", ["Yes"] * 10, 0.0),  # not even lowercased (vqaEval.py gives 0 too)
    ("yes", ["yes"] * 10, 1.0),
    # Disagreeing answers lose punctuation only: the 2 "2"s match; leaving out a "two" keeps 2 (2/3), a "2" 1.
    ("2", ["two"] * 8 + ["2"] * 2, (8 * 2 / 3 + 2 * 1 / 3) / 10),
    ("red", ["the red"] * 4 + ["red"] * 6, 1.0),  # "the red" keeps its article and matches nothing
    ("black white", ["black/white"] * 3 + ["black"] * 7, 0.9),  # (7 * 1 + 3 * 2/3) / 10
])
def test_vqa_accuracy_normalizes_answers_like_the_official_evaluation(prediction, answers, expected):
    assert vqa_accuracy({1: prediction}, {1: answers}) == pytest.approx(expected)


def test_vqa_accuracy_rejects_mismatched_questions():
    with pytest.raises(ValueError, match="annotations"):
        vqa_accuracy({}, {})
    with pytest.raises(ValueError, match="predictions"):
        vqa_accuracy({1: "yes"}, {1: ["yes"] * 10, 2: ["no"] * 10})
    with pytest.raises(ValueError, match="predictions"):
        vqa_accuracy({1: "yes", 3: "no"}, {1: ["yes"] * 10})


def test_vqa_soft_score():
    answers = ["Two", "2", "2 ", "3", "three", "dog", "dog", "dog", "dog", "a dog"]
    # "2" x3 -> 1; "3" x2 -> 2/3; "dog" x5 -> capped at 1.
    assert vqa_soft_score(answers) == pytest.approx({"2": 1.0, "3": 2 / 3, "dog": 1.0})


# ---------------------------------------------------------------- classification


def test_classification_accuracy_ids_scores_and_lists():
    labels = torch.tensor([0, 1, 1, 0])
    assert classification_accuracy(torch.tensor([0, 1, 0, 0]), labels) == pytest.approx(0.75)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])
    assert classification_accuracy(logits, labels) == pytest.approx(0.75)
    assert classification_accuracy([1, 1], [1, 0]) == pytest.approx(0.5)


def test_classification_accuracy_errors():
    with pytest.raises(ValueError, match="labels"):
        classification_accuracy([], [])
    with pytest.raises(ValueError, match="shape"):
        classification_accuracy([1, 0, 1], [1, 0])


# ---------------------------------------------------------------- captioning


def test_tokenize_caption():
    assert tokenize_caption("A man's Dog, running. Don't!") == ["a", "man", "'s", "dog", "running", "do", "n't"]


def test_bleu_perfect_match():
    refs = {1: ["a man riding a horse on the beach"], 2: ["two dogs play in the snow"]}
    hyps = {1: "A man riding a horse on the beach.", 2: "two dogs play in the snow"}
    assert bleu(refs, hyps) == pytest.approx([1.0] * 4)


def test_bleu_hand_case():
    # Hypothesis "the cat sat on mat" (5 tokens) against "the cat sat on the mat" (6 tokens):
    # 1-grams 5/5; 2-grams 3/4 ("on mat" misses); 3-grams 2/3 ("sat on mat" misses); 4-grams 1/2.
    # Brevity penalty exp(1 - 6/5) = exp(-0.2).
    # BLEU-1 = bp; BLEU-2 = bp * (3/4)^(1/2); BLEU-3 = bp * (1/2)^(1/3); BLEU-4 = bp * (1/4)^(1/4).
    bp = math.exp(-0.2)
    expected = [bp, bp * 0.75**0.5, bp * 0.5 ** (1 / 3), bp * 0.25**0.25]
    assert bleu({0: ["the cat sat on the mat"]}, {0: "the cat sat on mat"}) == pytest.approx(expected)


def test_bleu_clips_counts():
    # "the the the the" against "the cat": each "the" counts at most once -> BLEU-1 precision 1/4;
    # hypothesis is longer than the reference, so no brevity penalty.
    assert bleu({0: ["the cat"]}, {0: "the the the the"}, max_n=1) == pytest.approx([0.25])


def test_bleu_brevity_penalty_uses_closest_reference():
    refs = ["a b c d e f g h", "a b c"]
    # 2 tokens: the closest reference has 3 -> penalty exp(1 - 3/2); every unigram matches.
    assert bleu({0: refs}, {0: "a b"}, max_n=1) == pytest.approx([math.exp(-0.5)])
    # 4 tokens: closest is 3 (distance 1, not 8 at distance 4), longer than it -> no penalty.
    assert bleu({0: refs}, {0: "a b c d"}, max_n=1) == pytest.approx([1.0])


def test_caption_metric_errors():
    with pytest.raises(ValueError, match="references"):
        bleu({}, {})
    with pytest.raises(ValueError, match="references"):
        cider({}, {})
    with pytest.raises(ValueError, match="hypotheses"):
        cider({1: ["a dog"]}, {2: "a dog"})
    with pytest.raises(ValueError, match="references"):
        bleu({1: []}, {1: "a dog"})


REFS = {
    1: ["a man is riding a horse on the beach", "a person rides a brown horse near the ocean"],
    2: ["two dogs are playing in the snow", "a pair of dogs run through deep snow"],
    3: ["a plate of pasta with tomato sauce", "a bowl of spaghetti covered in red sauce"],
}


def test_cider_exact_match_beats_partial_match():
    exact = {key: refs[0] for key, refs in REFS.items()}
    partial = {1: "a man is on the beach", 2: "two dogs in the grass", 3: "a plate of food"}
    exact_score, partial_score = cider(REFS, exact), cider(REFS, partial)
    assert exact_score > partial_score > 0
    assert cider(REFS, {1: "a cat", 2: "a cat", 3: "a cat"}) < partial_score


def test_cider_penalizes_repetition_and_length():
    base = {1: "a man riding a horse", 2: "dogs in the snow", 3: "pasta with sauce"}
    # Clipping: repeating "horse" adds no matched weight beyond the references' single "horse", while it
    # grows the candidate's norm, and the longer candidate also pays the Gaussian length penalty.
    repeated = base | {1: "a man riding a horse horse horse horse"}
    assert cider(REFS, repeated) < cider(REFS, base)


def test_cider_single_image_is_zero():
    # With one image every reference n-gram has document frequency 1 = the image count: IDF log(1/1) = 0.
    assert cider({1: ["a dog"]}, {1: "a dog"}) == 0.0


# ---------------------------------------------------------------- retrieval

# 6 texts (2 per image) x 3 images.
SCORES = torch.tensor(
    [
        [0.90, 0.85, 0.20],  # text 0, image 0: no negative >= 0.90 -> rank 0
        [0.30, 0.82, 0.55],  # text 1, image 0: 0.82, 0.55 >= 0.30 -> rank 2
        [0.10, 0.80, 0.20],  # text 2, image 1: rank 0
        [0.70, 0.60, 0.10],  # text 3, image 1: 0.70 -> rank 1
        [0.20, 0.30, 0.10],  # text 4, image 2: 0.20, 0.30 -> rank 2
        [0.60, 0.20, 0.50],  # text 5, image 2: 0.60 -> rank 1
    ]
)
TEXT_TO_IMAGE = [0, 0, 1, 1, 2, 2]


def test_recall_at_k_hand_case():
    # Text -> image ranks [0, 2, 0, 1, 2, 1]: R@1 2/6, R@2 4/6, R@3 6/6.
    # Image -> text, best positive vs negatives: image 0 best 0.90, no negative above -> 0;
    # image 1 best 0.80, negatives 0.85, 0.82 above -> 2; image 2 best 0.50, negative 0.55 -> 1.
    # R@1 1/3, R@2 2/3, R@3 3/3. rsum = 100/3 + 200/3 + 100 twice = 400.
    result = recall_at_k(SCORES, TEXT_TO_IMAGE, ks=(1, 2, 3))
    expected = {"tr_r1": 100 / 3, "tr_r2": 200 / 3, "tr_r3": 100.0, "ir_r1": 100 / 3, "ir_r2": 200 / 3}
    assert result == pytest.approx(expected | {"ir_r3": 100.0, "rsum": 400.0})


def test_recall_at_k_default_keys_and_ties():
    identity = torch.eye(12)
    result = recall_at_k(identity, list(range(12)))
    assert set(result) == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum"}
    assert result["rsum"] == pytest.approx(600.0)
    # A constant score matrix ties every negative with the positive: no credit at R@1.
    assert recall_at_k(torch.ones(4, 4), [0, 1, 2, 3], ks=(1,))["ir_r1"] == 0.0


def test_recall_at_k_errors():
    with pytest.raises(ValueError, match="scores"):
        recall_at_k(torch.empty(0, 0), [])
    with pytest.raises(ValueError, match="text_to_image"):
        recall_at_k(SCORES, [0, 1])
    with pytest.raises(ValueError, match="text_to_image"):
        recall_at_k(SCORES, [0, 0, 0, 1, 1, 1])  # image 2 has no text
    with pytest.raises(ValueError, match="text_to_image"):
        recall_at_k(SCORES, [0, 0, 1, 1, 2, 3])


# ---------------------------------------------------------------- detection


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}


def _pred(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


TARGETS = [
    _target([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1]),
    _target([[5, 5, 15, 15]], [0]),
]


def test_detection_perfect_predictions():
    preds = [_pred(t["boxes"].tolist(), [0.9] * len(t["labels"]), t["labels"].tolist()) for t in TARGETS]
    assert detection_ap(preds, TARGETS) == pytest.approx({"ap": 1.0, "ap50": 1.0})


def test_detection_false_positive_ranked_first():
    # One target; a false positive (score 0.9) precedes the true positive (0.8).
    # Precision [0, 1/2] at recall [0, 1]; the envelope is 1/2 everywhere, so all 101 points give 0.5.
    targets = [_target([[0, 0, 10, 10]], [0])]
    preds = [_pred([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    assert detection_ap(preds, targets)["ap50"] == pytest.approx(0.5)


def test_detection_101_point_interpolation():
    # Two targets; detections TP (0.9), FP (0.8), TP (0.7): precision [1, 1/2, 2/3], recall [1/2, 1/2, 1].
    # Envelope [1, 2/3, 2/3]: recall points 0.00..0.50 (51) read 1, points 0.51..1.00 (50) read 2/3.
    # AP = (51 + 50 * 2/3) / 101.
    targets = [_target([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])]
    preds = [_pred([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])]
    assert detection_ap(preds, targets)["ap50"] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_detection_each_target_matched_once():
    # Two detections on the same single target: the second is a duplicate, hence a false positive
    # after recall is already 1, so AP stays 1.
    targets = [_target([[0, 0, 10, 10]], [0])]
    preds = [_pred([[0, 0, 10, 10], [0, 0, 10, 10.5]], [0.9, 0.8], [0, 0])]
    assert detection_ap(preds, targets)["ap50"] == pytest.approx(1.0)
    # Ranked first, the duplicate takes the target and the exact box becomes the false positive.
    preds = [_pred([[0, 0, 10, 10], [0, 0, 10, 10.5]], [0.8, 0.9], [0, 0])]
    assert detection_ap(preds, targets)["ap50"] == pytest.approx(1.0)


def test_detection_iou_thresholds():
    # IoU 72/100 = 0.72 passes thresholds 0.50..0.70 (5 of 10): ap50 = 1, ap = 0.5.
    targets = [_target([[0, 0, 10, 10]], [0])]
    preds = [_pred([[0, 0, 10, 7.2]], [0.9], [0])]
    assert detection_ap(preds, targets) == pytest.approx({"ap": 0.5, "ap50": 1.0})
    assert detection_ap(preds, targets, iou_thresholds=(0.75,)) == pytest.approx({"ap": 0.0, "ap50": 1.0})


def test_detection_no_predictions_and_ignored_class():
    empty = [_pred([], [], []) for _ in TARGETS]
    assert detection_ap(empty, TARGETS) == pytest.approx({"ap": 0.0, "ap50": 0.0})
    perfect = [_pred(t["boxes"].tolist(), [0.9] * len(t["labels"]), t["labels"].tolist()) for t in TARGETS]
    # Class 7 has no targets anywhere: its detections do not enter the mean over classes.
    with_extra = [perfect[0], _pred(perfect[1]["boxes"].tolist() + [[1, 1, 2, 2]], [0.9, 0.99], [0, 7])]
    assert detection_ap(with_extra, TARGETS) == pytest.approx({"ap": 1.0, "ap50": 1.0})


def test_detection_errors():
    with pytest.raises(ValueError, match="targets"):
        detection_ap([], [])
    with pytest.raises(ValueError, match="predictions"):
        detection_ap([], TARGETS)
    with pytest.raises(ValueError, match="labels"):
        detection_ap([_pred([], [], []), _pred([], [], [])], TARGETS, num_classes=1)


def test_recalls_and_accuracy_are_exact_decimal_fractions():
    # Only text 0 and image 0 find each other first: 1 hit in 25, 4 % exactly (a float32 mean gives 3.9999999106).
    scores = -torch.eye(25)
    scores[0, 0] = 1.0
    result = recall_at_k(scores, list(range(25)), ks=(1,))
    assert result["tr_r1"] == result["ir_r1"] == 4.0
    assert classification_accuracy([1] + [0] * 24, [1] * 25) == 0.04
