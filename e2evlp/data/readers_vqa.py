"""Reader for VQA v2 questions and annotations, with the official answer normalization and soft scores."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from e2evlp.answers import normalize_answer, vqa_soft_score

from .readers_base import BadRecord, Reader, int_field, list_field, read_json, str_field, top_level

# One answer normalization for targets and for the evaluation, so that training and scoring agree.
answer_scores = vqa_soft_score


@dataclass
class VQARecord:
    question_id: int
    image_id: int
    image_path: Path
    question: str
    answers: list[str] | None  # the 10 raw annotator answers; None for test questions
    multiple_choice_answer: str | None  # normalized; None for test questions
    target: dict[int, float] | None  # answer index → soft score; None without answers or answer_vocab


def soft_target(answers: Iterable[str], answer_index: Mapping[str, int]) -> dict[int, float]:
    """Soft scores of the answers in the vocabulary, keyed by answer index."""
    return {answer_index[a]: s for a, s in answer_scores(answers).items() if a in answer_index}


def coco_image_paths(coco_file: str | Path, image_root: str | Path) -> dict[int, Path]:
    """image id → image_root / file_name from the "images" list of any COCO file (for VQAReader)."""
    path = Path(coco_file)
    reader = Reader()
    pairs = reader.parse_all(
        path,
        top_level(read_json(path), path, "images"),
        lambda item: (int_field(item, "id"), Path(image_root) / str_field(item, "file_name")),
    )
    return dict(pairs)


def _answer_list(item: dict) -> list[str]:
    answers = list_field(item, "answers")
    if not answers:
        raise BadRecord("empty 'answers'")
    return [str_field(a, "answer") for a in answers]


class VQAReader(Reader):
    """Reads VQA v2 question (and, except for test, annotation) files.

    image_path_for maps an image id to its file: a callable, or a mapping such as coco_image_paths(...).
    With answer_vocab, each record's target holds the soft scores of its in-vocabulary answers.
    """

    def __init__(
        self,
        image_path_for: Callable[[int], Path] | Mapping[int, Path],
        answer_vocab: list[str] | None = None,
        *,
        check_images: bool = False,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(check_images=check_images, skip_bad=skip_bad)
        self.image_path_for = image_path_for
        self.answer_vocab = answer_vocab
        self._answer_index = {a: i for i, a in enumerate(answer_vocab)} if answer_vocab is not None else None

    def read(self, questions_file: str | Path, annotations_file: str | Path | None = None) -> list[VQARecord]:
        path = Path(questions_file)
        annotations = self._annotations(Path(annotations_file)) if annotations_file is not None else None
        questions = top_level(read_json(path), path, "questions")
        records = self.parse_all(path, questions, lambda item: self._record(item, annotations))
        return self.readable(path, records, lambda r: [r.image_path])

    def _annotations(self, path: Path) -> dict[int, tuple[int, list[str], str]]:
        """question id → (image id, raw answers, normalized multiple-choice answer)."""

        def parse(item: dict) -> tuple[int, tuple[int, list[str], str]]:
            question_id, image_id = int_field(item, "question_id"), int_field(item, "image_id")
            answer = normalize_answer(str_field(item, "multiple_choice_answer"))
            return question_id, (image_id, _answer_list(item), answer)

        return dict(self.parse_all(path, top_level(read_json(path), path, "annotations"), parse))

    def _record(self, item: dict, annotations: dict | None) -> VQARecord:
        question_id, image_id = int_field(item, "question_id"), int_field(item, "image_id")
        question, answers, answer = str_field(item, "question"), None, None
        if annotations is not None:
            if question_id not in annotations:
                raise BadRecord("question has no annotation")
            annotated_image, answers, answer = annotations[question_id]
            if annotated_image != image_id:
                raise BadRecord("image id differs from the annotation's", f"{image_id} vs {annotated_image}")
        target = soft_target(answers, self._answer_index) if answers and self._answer_index is not None else None
        return VQARecord(question_id, image_id, self._image_path(image_id), question, answers, answer, target)

    def _image_path(self, image_id: int) -> Path:
        try:
            lookup = self.image_path_for
            return Path(lookup[image_id] if isinstance(lookup, Mapping) else lookup(image_id))
        except KeyError as err:
            raise BadRecord("unknown image id", str(image_id)) from err


def build_answer_vocab(
    source: Iterable[str | Path | VQARecord], *, min_count: int = 9, top_k: int | None = None
) -> list[str]:
    """Normalized multiple-choice answers, most frequent first (ties alphabetical).

    source: annotation files or VQARecords. Keeps answers seen at least min_count times, or with
    top_k the top_k most frequent ones instead.
    """
    counts: Counter[str] = Counter()
    for item in source:
        if isinstance(item, VQARecord):
            counts.update([item.multiple_choice_answer] if item.multiple_choice_answer is not None else [])
        else:
            counts.update(_multiple_choice_answers(Path(item)))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if top_k is not None:
        return [a for a, _ in ranked[:top_k]]
    return [a for a, c in ranked if c >= min_count]


def _multiple_choice_answers(path: Path) -> list[str]:
    """Normalized multiple-choice answers of an annotation file; any bad record is an error here."""
    items = top_level(read_json(path), path, "annotations")
    return Reader().parse_all(path, items, lambda item: normalize_answer(str_field(item, "multiple_choice_answer")))
