"""VQA answer normalization (the official vqaEval.py rules) and soft scores: shared by the VQA reader's targets
and the VQA accuracy, so that training and scoring agree. A leaf: imports nothing of e2evlp."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["normalize_answer", "strip_punctuation", "vqa_soft_score"]

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


def strip_punctuation(text: str) -> str:
    """The VQA evaluation's punctuation rule alone (vqa_accuracy applies it to disagreeing annotators' answers):
    a mark touching a space, or any mark in an answer holding a number like "1,000", is deleted; otherwise it
    separates words ("black/white" -> "black white")."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalization: punctuation, lowercase, number words, articles, contractions."""
    text = strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTION_FIXES.get(word, word) for word in words if word not in _ARTICLES)


def vqa_soft_score(answers: Sequence[str]) -> dict[str, float]:
    """Soft target per normalized answer: min(1, count / 3) over the annotators' answers."""
    counts = Counter(normalize_answer(answer) for answer in answers)
    return {answer: min(1.0, count / 3) for answer, count in counts.items()}
