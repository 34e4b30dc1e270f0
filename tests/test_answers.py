"""e2evlp.answers: the VQA answer normalization shared by the VQA reader's targets and the VQA accuracy."""

import pytest

import e2evlp.data.readers
import e2evlp.eval
import e2evlp.eval.metrics
from e2evlp import answers
from e2evlp.answers import normalize_answer


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),
        ("Two!", "2"),
        ("none", "0"),
        ("The dog.", "dog"),
        ("a dog", "dog"),
        ("an apple", "apple"),
        ("an apple,", "apple"),
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),
        ("The  Cat's toy.", "cat's toy"),
        ("black/white", "black white"),
        ("yes-no", "yes no"),
        ("yes !", "yes"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("3.5", "3.5"),
        ("  Red\n", "red"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_public_names_are_the_shared_functions():
    # One normalization for training targets and for scoring: every public path is the same function.
    for module in (e2evlp.eval, e2evlp.eval.metrics, e2evlp.data.readers):
        assert module.normalize_answer is answers.normalize_answer
    assert e2evlp.eval.vqa_soft_score is e2evlp.eval.metrics.vqa_soft_score is answers.vqa_soft_score
    assert e2evlp.data.readers.answer_scores is answers.vqa_soft_score
