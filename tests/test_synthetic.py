"""Synthetic data set: real file formats, annotations consistent with the drawn pixels, seeded reproducibility."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2evlp.data.readers import NLVR2Reader
from e2evlp.data.synthetic import COLOR_RGB, COLORS, SHAPES, write_synthetic_dataset

SIZE = (64, 64)
SPLITS = ("train", "val")


def _generate(root, seed=0):
    return write_synthetic_dataset(root, num_train=12, num_val=6, image_size=SIZE, seed=seed)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, _generate(root)


def _load(path):
    return json.loads(Path(path).read_text())


def _nlvr2_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _all_files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _scenes(instances):
    """image id -> list of (shape, colour, bbox) from a COCO instances file."""
    names = {c["id"]: c["name"] for c in instances["categories"]}
    attrs = {a["id"]: a["name"] for a in instances["attributes"]}
    scenes = {image["id"]: [] for image in instances["images"]}
    for ann in instances["annotations"]:
        scenes[ann["image_id"]].append((names[ann["category_id"]], attrs[ann["attribute_ids"][0]], ann["bbox"]))
    return scenes


def test_every_file_exists_and_parses(dataset):
    root, summary = dataset
    assert summary["classes"] == list(SHAPES) and summary["attributes"] == list(COLORS)
    for split in SPLITS:
        paths, counts = summary["paths"][split], summary["counts"][split]
        captions, instances = _load(paths["captions"]), _load(paths["instances"])
        assert captions["images"] == instances["images"] and len(captions["images"]) == counts["images"]
        assert len(captions["annotations"]) == 3 * counts["images"] == counts["captions"]
        assert len(instances["annotations"]) == counts["objects"]
        assert [c["name"] for c in instances["categories"]] == list(SHAPES)
        for image in captions["images"]:
            with Image.open(Path(paths["images"]) / image["file_name"]) as im:
                assert im.mode == "RGB" and im.size == (image["width"], image["height"]) == SIZE[::-1]
        questions = _load(paths["vqa_questions"])["questions"]
        assert len(questions) == counts["questions"]
        assert 2 * counts["images"] <= len(questions) <= 3 * counts["images"]
        assert len(_load(paths["vqa_annotations"])["annotations"]) == len(questions)
        assert len(_nlvr2_rows(paths["nlvr2"])) == counts["nlvr2_pairs"]
    assert "annotations/" in Path(summary["paths"]["readme"]).read_text()
    assert _load(summary["paths"]["karpathy"])["dataset"] == "synthetic"


def test_boxes_lie_inside_the_image_and_hold_the_shapes_colour(dataset):
    root, summary = dataset
    for split in SPLITS:
        paths = summary["paths"][split]
        instances = _load(paths["instances"])
        files = {image["id"]: image["file_name"] for image in instances["images"]}
        for image_id, scene in _scenes(instances).items():
            pixels = np.asarray(Image.open(Path(paths["images"]) / files[image_id]))
            for _, color, (x, y, w, h) in scene:
                assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE[1] and y + h <= SIZE[0]
                crop = pixels[int(y) : int(y + h), int(x) : int(x + w)]
                # A triangle fills half its box and a later shape may cover a little of it: a fifth is a safe floor.
                assert (crop == COLOR_RGB[color]).all(-1).mean() > 0.2


def test_captions_mention_only_present_shapes_and_colours(dataset):
    root, summary = dataset
    for split in SPLITS:
        scenes = _scenes(_load(summary["paths"][split]["instances"]))
        for ann in _load(summary["paths"][split]["captions"])["annotations"]:
            words = set(ann["caption"].split()) | {w.rstrip(":,") for w in ann["caption"].split()}
            shapes = {s for s in SHAPES if s in words or s + "s" in words}
            colors = {c for c in COLORS if c in words}
            present = scenes[ann["image_id"]]
            assert shapes and shapes <= {shape for shape, _, _ in present}, ann
            assert colors <= {color for _, color, _ in present}, ann


def _vqa_truth(question, scene):
    """The answer read off the COCO boxes; "small"/"large" pick the narrowest/widest box of that shape."""
    words = question.rstrip("?").split()
    if question.startswith("how many"):
        return str(sum(shape == words[2][:-1] for shape, _, _ in scene))
    if question.startswith("is there"):
        return "yes" if (words[3], words[4]) in {(color, shape) for shape, color, _ in scene} else "no"
    boxes = [(box[2], color) for shape, color, box in scene if shape == words[-1]]
    if words[-2] == "small":
        return min(boxes)[1]
    if words[-2] == "large":
        return max(boxes)[1]
    assert len(boxes) == 1, question
    return boxes[0][1]


def test_vqa_answers_agree_with_the_scene(dataset):
    root, summary = dataset
    noisy = 0
    for split in SPLITS:
        paths = summary["paths"][split]
        scenes = _scenes(_load(paths["instances"]))
        questions = {q["question_id"]: q for q in _load(paths["vqa_questions"])["questions"]}
        for ann in _load(paths["vqa_annotations"])["annotations"]:
            question = questions[ann["question_id"]]
            assert question["image_id"] == ann["image_id"]
            truth = _vqa_truth(question["question"], scenes[ann["image_id"]])
            answers = [a["answer"] for a in ann["answers"]]
            assert ann["multiple_choice_answer"] == truth == Counter(answers).most_common(1)[0][0]
            assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
            assert answers.count(truth) >= 8
            noisy += answers.count(truth) < 10
    assert noisy > 0  # soft scores below 1 get exercised


def test_nlvr2_images_exist_and_labels_balance(dataset):
    root, summary = dataset
    for split in SPLITS:
        paths = summary["paths"][split]
        rows = _nlvr2_rows(paths["nlvr2"])
        for row in rows:
            stem = row["identifier"].rsplit("-", 1)[0]
            for k in (0, 1):
                assert (Path(paths["nlvr2_images"]) / row.get("directory", "") / f"{stem}-img{k}.png").is_file()
            assert row["sentence"] and row["label"] in ("True", "False")
        # The real reader finds every image, train's in its numbered folder.
        records = NLVR2Reader(paths["nlvr2_images"], check_images=True).read(paths["nlvr2"])
        assert len(records) == len(rows) and all(r.left_path.is_file() and r.right_path.is_file() for r in records)
        num_true = sum(row["label"] == "True" for row in rows)
        assert abs(num_true / len(rows) - 0.5) <= 0.3


def test_karpathy_split_covers_every_image_once(dataset):
    root, summary = dataset
    images = _load(summary["paths"]["karpathy"])["images"]
    listed = Counter(f"{image['filepath']}/{image['filename']}" for image in images)
    on_disk = {str(p.relative_to(root)) for split in SPLITS for p in (root / "images" / split).glob("*.png")}
    assert set(listed) == on_disk and set(listed.values()) == {1}
    assert Counter(image["split"] for image in images) == {"train": 12, "val": 3, "test": 3}
    assert [image["imgid"] for image in images] == list(range(len(images)))
    for image in images:
        for sentence in image["sentences"]:
            assert sentence["imgid"] == image["imgid"]
            assert sentence["tokens"] == sentence["raw"].replace(":", "").replace(",", "").split()


def test_same_seed_gives_identical_files_and_another_seed_differs(dataset, tmp_path):
    root, _ = dataset
    _generate(tmp_path / "again")
    _generate(tmp_path / "other", seed=1)
    reference = _all_files(root)
    assert _all_files(tmp_path / "again") == reference
    other = _all_files(tmp_path / "other")
    assert other.keys() == reference.keys()  # same layout; only contents change with the seed
    assert [k for k in reference if k.suffix == ".json" and other[k] != reference[k]]


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="num_val"):
        write_synthetic_dataset(tmp_path, num_val=0)
    with pytest.raises(ValueError, match="image_size"):
        write_synthetic_dataset(tmp_path, image_size=(16, 16))


def test_shipped_vocabulary_covers_every_text_without_unknown_tokens(dataset):
    from e2evlp.models.text import load_tokenizer

    root, summary = dataset
    tokenizer = load_tokenizer(summary["paths"]["tokenizer"])
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id] == [0, 1, 2, 3, 4]
    texts = []
    for split in SPLITS:
        paths = summary["paths"][split]
        texts += [a["caption"] for a in _load(paths["captions"])["annotations"]]
        texts += [q["question"] for q in _load(paths["vqa_questions"])["questions"]]
        texts += [a["answer"] for ann in _load(paths["vqa_annotations"])["annotations"] for a in ann["answers"]]
        texts += [row["sentence"] for row in _nlvr2_rows(paths["nlvr2"])]
    encoded = tokenizer(texts)["input_ids"]
    assert all(tokenizer.unk_token_id not in ids for ids in encoded)
