"""Seeded synthetic data set of coloured shapes, written in the real COCO, VQA v2, NLVR2 and Karpathy file formats."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from e2evlp.io import atomic_write

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
COLOR_RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40)}
BACKGROUND_RGB = (240, 240, 240)
SPLITS = ("train", "val")
# NLVR2 calls its validation split "dev"; keeping its names lets one reader serve both data sets.
NLVR2_SPLITS = {"train": "train", "val": "dev"}

NUMBER_WORDS = ("zero", "one", "two", "three", "four")
# A shape's side as a fraction of the image's shorter side; disjoint bands keep "small"/"large" readable from the box.
# BERT's special tokens first (ids 0-4), then every word and punctuation mark the templates below can write.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_TEMPLATE_WORDS = (
    "a above and are background below both color contain contains exactly has how image images is left many "
    "more of on one picture plain right shape shapes than the there what yes no ? : ,"
)
_SIZE_RANGE = {"small": (0.18, 0.26), "large": (0.32, 0.42)}
_MIN_SIDE = 6
_MAX_OVERLAP = 0.1  # of the smaller box's area: shapes may touch but each stays mostly visible
_PLACEMENT_TRIES = 50
# Separate random streams per split and task, so changing one count leaves the other files unchanged.
_STREAMS = ("coco", "nlvr2")


@dataclass(frozen=True)
class Shape:
    """One drawn shape; `box` is (x, y, w, h) in pixels, COCO's order."""

    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2

    @property
    def area(self) -> float:
        w, h = self.box[2:]
        factor = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[self.shape]
        return round(float(factor * w * h), 2)


@dataclass(frozen=True)
class _Record:
    image_id: int
    scene: list[Shape]
    captions: list[str]

    @property
    def file_name(self) -> str:
        return f"{self.image_id:06d}.png"


def write_synthetic_dataset(root, *, num_train=200, num_val=50, image_size=(96, 128), seed=0) -> dict:
    """Write the data set under `root`; `image_size` is (height, width). Returns paths, counts and names."""
    height, width = _check_args(num_train, num_val, image_size, seed)
    root = Path(root)
    first_ids = {"train": 1, "val": num_train + 1}  # COCO image ids are unique across splits
    counts = {"train": num_train, "val": num_val}
    summary = {
        "root": str(root),
        "seed": seed,
        "image_size": [height, width],
        "classes": list(SHAPES),
        "attributes": list(COLORS),
        "nlvr2_splits": dict(NLVR2_SPLITS),
        "paths": {},
        "counts": {},
    }
    records_by_split = {}
    for split in SPLITS:
        rng = _rng(seed, split, "coco")
        ids = range(first_ids[split], first_ids[split] + counts[split])
        records = [_make_record(rng, image_id, height, width) for image_id in ids]
        records_by_split[split] = records
        for record in records:
            _write_png(root / "images" / split / record.file_name, _draw(record.scene, height, width))
        num_pairs = 2 * max(1, counts[split] // 4)  # even, so the NLVR2 labels balance exactly
        vqa_paths, num_questions = _write_vqa(root, split, records, rng)
        summary["paths"][split] = {
            "images": str(root / "images" / split),
            **_write_coco(root, split, records, height, width),
            **vqa_paths,
            **_write_nlvr2(root, split, num_pairs, _rng(seed, split, "nlvr2"), height, width),
        }
        summary["counts"][split] = {
            "images": len(records),
            "captions": sum(len(r.captions) for r in records),
            "objects": sum(len(r.scene) for r in records),
            "questions": num_questions,
            "nlvr2_pairs": num_pairs,
        }
    summary["paths"]["karpathy"] = str(_write_karpathy(root, records_by_split))
    summary["paths"]["tokenizer"] = str(_write_text(root / "tokenizer" / "vocab.txt",
                                                    "\n".join(vocabulary()) + "\n").parent)
    summary["paths"]["readme"] = str(_write_text(root / "README.txt", _readme(height, width, seed)))
    return summary


def vocabulary() -> list[str]:
    """The word-level WordPiece vocabulary (BERT special tokens at ids 0-4) covering every text written here;
    the same for every seed and size, so one tokenizer serves all synthetic sets."""
    words = set(_TEMPLATE_WORDS.split()) | set(SHAPES) | {s + "s" for s in SHAPES} | set(COLORS) | set(SIZES)
    words |= set(NUMBER_WORDS) | {str(n) for n in range(len(NUMBER_WORDS))}
    return list(SPECIAL_TOKENS) + sorted(words)


def _check_args(num_train, num_val, image_size, seed) -> tuple[int, int]:
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if len(image_size) != 2 or min(image_size) < 32:
        raise ValueError(f"image_size must be (height, width), both >= 32, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _rng(seed: int, split: str, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), _STREAMS.index(stream)])


def _make_record(rng: np.random.Generator, image_id: int, height: int, width: int) -> _Record:
    scene = random_scene(rng, height, width)
    return _Record(image_id, scene, _captions(scene, rng))


# ---------------------------------------------------------------------------------------------- scenes


def random_scene(rng: np.random.Generator, height: int, width: int) -> list[Shape]:
    """1-4 random shapes placed without heavy overlap; a shape that finds no room is left out."""
    scene: list[Shape] = []
    for _ in range(int(rng.integers(1, 5))):
        shape, color, size = _pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, SIZES)
        low, high = _SIZE_RANGE[size]
        side = max(_MIN_SIDE, round(rng.uniform(low, high) * min(height, width)))
        box = _place(rng, side, height, width, [s.box for s in scene])
        if box is not None:
            scene.append(Shape(shape, color, size, box))
    return scene


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _place(rng, side, height, width, boxes):
    for _ in range(_PLACEMENT_TRIES):
        box = (int(rng.integers(width - side + 1)), int(rng.integers(height - side + 1)), side, side)
        if all(_intersection(box, other) <= _MAX_OVERLAP * min(side * side, other[2] * other[3]) for other in boxes):
            return box
    return None


def _intersection(a, b) -> int:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def _draw(scene: list[Shape], height: int, width: int) -> Image.Image:
    image = Image.new("RGB", (width, height), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    for s in scene:
        x, y, w, h = s.box
        x1, y1 = x + w - 1, y + h - 1  # PIL's corners are inclusive: the shape spans exactly w x h pixels
        fill = COLOR_RGB[s.color]
        if s.shape == "circle":
            draw.ellipse([x, y, x1, y1], fill=fill)
        elif s.shape == "square":
            draw.rectangle([x, y, x1, y1], fill=fill)
        else:
            draw.polygon([(x, y1), (x1, y1), (x + (w - 1) // 2, y)], fill=fill)
    return image


# -------------------------------------------------------------------------------------------- captions


def _phrase(s: Shape, *, size=True) -> str:
    return f"a {s.size} {s.color} {s.shape}" if size else f"a {s.color} {s.shape}"


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _left_to_right(scene: list[Shape]) -> list[Shape]:
    return sorted(scene, key=lambda s: s.center)


def _caption_relation(scene, rng) -> str:
    if len(scene) == 1:
        return _phrase(scene[0]) + " on a plain background"
    i, j = rng.choice(len(scene), size=2, replace=False)
    a, b = scene[int(i)], scene[int(j)]
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    if abs(dx) >= abs(dy):
        relation = "left of" if dx > 0 else "right of"
    else:
        relation = "above" if dy > 0 else "below"
    return f"{_phrase(a)} {relation} {_phrase(b)}"


def _caption_listing(scene, rng) -> str:
    return "there is " + _join([_phrase(s, size=False) for s in _left_to_right(scene)])


def _caption_count(scene, rng) -> str:
    counts = Counter(s.shape for s in _left_to_right(scene))
    parts = [f"a {name}" if n == 1 else f"{NUMBER_WORDS[n]} {name}s" for name, n in counts.items()]
    return f"{NUMBER_WORDS[len(scene)]} {_plural('shape', len(scene))}: {_join(parts)}"


def _caption_by_size(scene, rng) -> str:
    biggest_first = sorted(scene, key=lambda s: -s.box[2])
    return "a picture of " + _join([_phrase(s, size=False) for s in biggest_first])


_CAPTION_TEMPLATES = (_caption_relation, _caption_listing, _caption_count, _caption_by_size)


def _captions(scene: list[Shape], rng) -> list[str]:
    order = rng.permutation(len(_CAPTION_TEMPLATES))[:3]
    return [_CAPTION_TEMPLATES[int(k)](scene, rng) for k in order]


# ------------------------------------------------------------------------------------------------- VQA


def _color_question(scene, rng):
    """Asks about a shape the words single out (its type, else its size and type); None if none is."""
    by_shape = Counter(s.shape for s in scene)
    by_size_shape = Counter((s.size, s.shape) for s in scene)
    candidates = [(f"the {s.shape}", s.color) for s in scene if by_shape[s.shape] == 1]
    candidates += [
        (f"the {s.size} {s.shape}", s.color)
        for s in scene
        if by_shape[s.shape] > 1 and by_size_shape[(s.size, s.shape)] == 1
    ]
    if not candidates:
        return None
    target, answer = candidates[int(rng.integers(len(candidates)))]
    return f"what color is {target}?", "what color is the", "other", answer


def _count_question(scene, rng):
    shape = _pick(rng, SHAPES)
    count = sum(s.shape == shape for s in scene)
    return f"how many {shape}s are there?", "how many", "number", str(count)


def _yes_no_question(scene, rng, want_yes: bool):
    present = sorted({(s.color, s.shape) for s in scene})
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    color, shape = _pick(rng, present if want_yes else absent)
    return f"is there a {color} {shape}?", "is there a", "yes/no", "yes" if want_yes else "no"


def _questions(scene, rng) -> list[tuple[str, str, str, str]]:
    """2-3 distinct questions; a yes/no question of the other polarity stands in for an ambiguous colour one."""
    want_yes = bool(rng.random() < 0.5)
    third = _color_question(scene, rng) or _yes_no_question(scene, rng, not want_yes)
    pool = [_count_question(scene, rng), _yes_no_question(scene, rng, want_yes), third]
    return [pool[int(k)] for k in rng.permutation(3)[: int(rng.integers(2, 4))]]


def _wrong_answers(answer: str, answer_type: str) -> list[str]:
    space = {"yes/no": ["yes", "no"], "number": [str(n) for n in range(5)], "other": list(COLORS)}[answer_type]
    return [a for a in space if a != answer]


def _answers(answer: str, answer_type: str, rng) -> list[dict]:
    """Ten annotators: 8-10 give the true answer, so VQA's soft scores see some disagreement."""
    wrong = _wrong_answers(answer, answer_type)
    num_correct = int(rng.integers(8, 11))
    given = [answer] * num_correct + [_pick(rng, wrong) for _ in range(10 - num_correct)]
    given = [given[int(k)] for k in rng.permutation(10)]
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(given)]


def _write_vqa(root: Path, split: str, records: list[_Record], rng) -> tuple[dict, int]:
    questions, annotations = [], []
    for record in records:
        for j, (question, question_type, answer_type, answer) in enumerate(_questions(record.scene, rng)):
            question_id = record.image_id * 1000 + j  # VQA's own scheme: image id, then a per-image index
            questions.append({"image_id": record.image_id, "question": question, "question_id": question_id})
            annotations.append(
                {
                    "question_id": question_id,
                    "image_id": record.image_id,
                    "question_type": question_type,
                    "answer_type": answer_type,
                    "multiple_choice_answer": answer,
                    "answers": _answers(answer, answer_type, rng),
                }
            )
    header = {"info": _info(), "license": {}, "data_type": "mscoco", "data_subtype": f"{split}2014"}
    q_path = root / "vqa" / f"v2_OpenEnded_mscoco_{split}2014_questions.json"
    a_path = root / "vqa" / f"v2_mscoco_{split}2014_annotations.json"
    _write_json(q_path, {**header, "task_type": "Open-Ended", "questions": questions})
    _write_json(a_path, {**header, "annotations": annotations})
    return {"vqa_questions": str(q_path), "vqa_annotations": str(a_path)}, len(questions)


# ------------------------------------------------------------------------------------------------ COCO


def _info() -> dict:
    return {"description": "e2evlp synthetic coloured shapes", "version": "1.0", "contributor": "e2evlp"}


def _coco_images(records: list[_Record], height: int, width: int) -> list[dict]:
    return [{"id": r.image_id, "file_name": r.file_name, "height": height, "width": width} for r in records]


def _write_coco(root: Path, split: str, records: list[_Record], height: int, width: int) -> dict:
    images = _coco_images(records, height, width)
    captions = [
        {"id": r.image_id * 10 + k, "image_id": r.image_id, "caption": caption}
        for r in records
        for k, caption in enumerate(r.captions)
    ]
    objects = [
        {
            "id": r.image_id * 10 + k,
            "image_id": r.image_id,
            "category_id": SHAPES.index(s.shape) + 1,
            "bbox": [float(v) for v in s.box],
            "area": s.area,
            "iscrowd": 0,
            "attribute_ids": [COLORS.index(s.color)],
        }
        for r in records
        for k, s in enumerate(r.scene)
    ]
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]
    attributes = [{"id": i, "name": name} for i, name in enumerate(COLORS)]
    cap_path = root / "annotations" / f"captions_{split}.json"
    inst_path = root / "annotations" / f"instances_{split}.json"
    header = {"info": _info(), "licenses": [], "images": images}
    _write_json(cap_path, {**header, "annotations": captions})
    _write_json(inst_path, {**header, "annotations": objects, "categories": categories, "attributes": attributes})
    return {"captions": str(cap_path), "instances": str(inst_path)}


# ----------------------------------------------------------------------------------------------- NLVR2


def _nlvr2_statements(left: list[Shape], right: list[Shape]) -> dict[str, list[tuple[str, bool]]]:
    """Every sentence this generator can say about a pair, grouped by template, with its truth value."""
    sides = {"left": left, "right": right}
    more = []
    for shape in SHAPES:
        count = {side: sum(s.shape == shape for s in scene) for side, scene in sides.items()}
        more.append((f"the left image has more {shape}s than the right image", count["left"] > count["right"]))
        more.append((f"the right image has more {shape}s than the left image", count["right"] > count["left"]))
    both = [
        (f"both images contain a {color} shape", all(any(s.color == color for s in sc) for sc in (left, right)))
        for color in COLORS
    ]
    exactly_one = [
        (
            f"exactly one image contains a {color} {shape}",
            sum(any((s.color, s.shape) == (color, shape) for s in sc) for sc in (left, right)) == 1,
        )
        for color in COLORS
        for shape in SHAPES
    ]
    exact_count = [
        (f"the {side} image contains exactly {NUMBER_WORDS[n]} {_plural('shape', n)}", len(scene) == n)
        for side, scene in sides.items()
        for n in range(1, 5)
    ]
    return {"more": more, "both": both, "exactly_one": exactly_one, "exact_count": exact_count}


def _nlvr2_sentence(left, right, label: bool, rng) -> str:
    """A template drawn at random among those that can state `label` for this pair, then one such sentence."""
    groups = _nlvr2_statements(left, right)
    fitting = [[sentence for sentence, truth in group if truth == label] for group in groups.values()]
    fitting = [group for group in fitting if group]  # exact_count always fits both labels, so never empty
    group = fitting[int(rng.integers(len(fitting)))]
    return group[int(rng.integers(len(group)))]


def _write_nlvr2(root: Path, split: str, num_pairs: int, rng, height: int, width: int) -> dict:
    name = NLVR2_SPLITS[split]
    labels = rng.permutation([n % 2 == 0 for n in range(num_pairs)])
    # As in NLVR2, train images sit in numbered folders named by each row's "directory"; dev images do not.
    directory = {"directory": "0"} if split == "train" else {}
    folder = root / "nlvr2" / "images" / name / directory.get("directory", "")
    rows = []
    for n, label in enumerate(labels):
        left, right = random_scene(rng, height, width), random_scene(rng, height, width)
        for k, scene in enumerate((left, right)):
            _write_png(folder / f"{name}-{n}-0-img{k}.png", _draw(scene, height, width))
        rows.append(
            {
                "identifier": f"{name}-{n}-0-0",
                "sentence": _nlvr2_sentence(left, right, bool(label), rng),
                "label": str(bool(label)),
                "left_url": "",
                "right_url": "",
                **directory,
            }
        )
    path = root / "nlvr2" / f"{name}.json"
    _write_bytes(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode())
    return {"nlvr2": str(path), "nlvr2_images": str(root / "nlvr2" / "images" / name)}


# -------------------------------------------------------------------------------------- Karpathy, README


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _write_karpathy(root: Path, records_by_split: dict[str, list[_Record]]) -> Path:
    images, sentid = [], 0
    for split, records in records_by_split.items():
        num_test = len(records) // 2 if split == "val" else 0
        for i, record in enumerate(records):
            imgid = len(images)
            sentences = []
            for caption in record.captions:
                sentences.append({"tokens": _tokens(caption), "raw": caption, "imgid": imgid, "sentid": sentid})
                sentid += 1
            images.append(
                {
                    "filepath": f"images/{split}",
                    "filename": record.file_name,
                    "imgid": imgid,
                    "cocoid": record.image_id,
                    "split": "test" if i >= len(records) - num_test else split,
                    "sentids": [s["sentid"] for s in sentences],
                    "sentences": sentences,
                }
            )
    path = root / "dataset_synthetic.json"
    _write_json(path, {"dataset": "synthetic", "images": images})
    return path


_README_LAYOUT = (
    ("images/{train,val}/NNNNNN.png", "scenes of 1-4 shapes, named by COCO image id"),
    ("annotations/captions_{split}.json", "COCO captions, 3 per image"),
    ("annotations/instances_{split}.json", "COCO instances, bbox [x, y, w, h] in pixels; our extension:"),
    ("", "attribute_ids per box and an attributes list (Visual Genome style)"),
    ("vqa/v2_OpenEnded_mscoco_{split}2014_questions.json", "VQA v2 questions, 2-3 per image"),
    ("vqa/v2_mscoco_{split}2014_annotations.json", "VQA v2 answers, 10 per question"),
    ("nlvr2/{train,dev}.json", "NLVR2 JSON lines; dev is the val split"),
    ("nlvr2/images/{train/0,dev}/{pair}-img{0,1}.png", "NLVR2 image pairs"),
    ("dataset_synthetic.json", 'Karpathy-style split covering all images (half of val is "test")'),
    ("tokenizer/vocab.txt", "BERT WordPiece vocabulary of every word above (load_tokenizer reads it)"),
)


def _readme(height: int, width: int, seed: int) -> str:
    header = [
        f"e2evlp synthetic coloured shapes: seed {seed}, RGB PNG images {width}x{height} (width x height).",
        f"Classes are shapes ({', '.join(SHAPES)}); attributes are colours ({', '.join(COLORS)}).",
        "",
    ]
    column = max(len(path) for path, _ in _README_LAYOUT) + 2
    return "\n".join(header + [path.ljust(column) + text for path, text in _README_LAYOUT]) + "\n"


# --------------------------------------------------------------------------------------------- writing


def _write_bytes(path: Path, data: bytes) -> Path:
    """Atomic: a reader never sees a half-written file, and an interrupted run leaves no partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path


def _write_json(path: Path, obj) -> Path:
    return _write_bytes(path, (json.dumps(obj, sort_keys=True) + "\n").encode())


def _write_text(path: Path, text: str) -> Path:
    return _write_bytes(path, text.encode())


def _write_png(path: Path, image: Image.Image) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return _write_bytes(path, buffer.getvalue())
