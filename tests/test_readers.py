"""Tests for e2evlp.data.readers on small files written in each dataset's real format."""

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from e2evlp.data.readers import (
    CocoCaptionsReader,
    CocoInstancesReader,
    DataError,
    KarpathyReader,
    NLVR2Reader,
    VisualGenomeReader,
    VisualGenomeRegionsReader,
    VQAReader,
    answer_scores,
    build_answer_vocab,
    coco_image_paths,
    load_image,
    read_vocab,
)


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def make_png(path: Path, size=(8, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


def make_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return path


COCO_IMAGES = [
    {"id": 1, "file_name": "a.png", "width": 64, "height": 32},
    {"id": 2, "file_name": "b.png", "width": 16, "height": 16},
]


# ---------------------------------------------------------------- images


def test_load_image_rgb_and_errors(tmp_path):
    gray = tmp_path / "g.png"
    Image.new("L", (3, 2)).save(gray)
    img = load_image(gray)
    assert img.mode == "RGB" and img.size == (3, 2)
    with pytest.raises(DataError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(DataError, match="bad.png"):
        load_image(make_corrupt(tmp_path / "bad.png"))


# ---------------------------------------------------------------- COCO captions


def captions_file(tmp_path, annotations=None):
    annotations = annotations or [
        {"id": 10, "image_id": 1, "caption": "A red square. "},
        {"id": 11, "image_id": 2, "caption": "Another one."},
        {"id": 12, "image_id": 1, "caption": "Red."},
    ]
    return write_json(tmp_path / "captions_val2014.json", {"images": COCO_IMAGES, "annotations": annotations})


def test_coco_captions_fields(tmp_path):
    records = CocoCaptionsReader(tmp_path / "img").read(captions_file(tmp_path))
    assert [(r.image_id, r.image_path, r.width, r.height, r.captions) for r in records] == [
        (1, tmp_path / "img" / "a.png", 64, 32, ["A red square.", "Red."]),
        (2, tmp_path / "img" / "b.png", 16, 16, ["Another one."]),
    ]


def test_coco_captions_check_images(tmp_path):
    make_png(tmp_path / "img" / "a.png")
    make_corrupt(tmp_path / "img" / "b.png")
    with pytest.raises(DataError, match=r"captions_val2014\.json.*image_id=2.*b\.png"):
        CocoCaptionsReader(tmp_path / "img", check_images=True).read(captions_file(tmp_path))
    reader = CocoCaptionsReader(tmp_path / "img", check_images=True, skip_bad=True)
    assert [r.image_id for r in reader.read(captions_file(tmp_path))] == [1]
    assert reader.skipped == {"corrupt image file": 1}
    (tmp_path / "img" / "b.png").unlink()
    reader = CocoCaptionsReader(tmp_path / "img", check_images=True, skip_bad=True)
    reader.read(captions_file(tmp_path))
    assert reader.skipped == {"missing image file": 1}


def test_coco_captions_unknown_image_and_missing_field(tmp_path, caplog):
    bad = [
        {"id": 10, "image_id": 1, "caption": "ok"},
        {"id": 11, "image_id": 99, "caption": "no such image"},
        {"id": 12, "image_id": 2},
        {"id": 13, "image_id": 98, "caption": "again"},
    ]
    path = captions_file(tmp_path, bad)
    with pytest.raises(DataError, match=r"captions_val2014\.json: record #1 \(image_id=99\): unknown image id"):
        CocoCaptionsReader(tmp_path).read(path)
    reader = CocoCaptionsReader(tmp_path, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="e2evlp.data"):
        records = reader.read(path)
    assert [r.captions for r in records] == [["ok"], []]
    assert reader.skipped == {"unknown image id": 2, "missing field 'caption'": 1}
    # Logged once per reason, not once per record.
    assert len(caplog.records) == 2 and "captions_val2014.json" in caplog.records[0].getMessage()


def test_malformed_json_names_file(tmp_path):
    path = tmp_path / "captions_broken.json"
    path.write_text('{"images": [')
    for skip_bad in (False, True):  # a broken file cannot be skipped record by record
        with pytest.raises(DataError, match="captions_broken.json.*malformed JSON"):
            CocoCaptionsReader(tmp_path, skip_bad=skip_bad).read(path)
    with pytest.raises(DataError, match="nothere.json"):
        CocoCaptionsReader(tmp_path).read(tmp_path / "nothere.json")


# ---------------------------------------------------------------- COCO instances


def instances_file(tmp_path, annotations):
    data = {
        "images": COCO_IMAGES,
        "annotations": annotations,
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "attributes": [{"id": 7, "name": "red"}, {"id": 2, "name": "small"}],
    }
    return write_json(tmp_path / "instances_val2017.json", data)


def test_coco_instances_boxes_classes_attributes(tmp_path):
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 18, "bbox": [8, 4, 16, 8], "iscrowd": 0, "attribute_ids": [7, 2]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 64, 32], "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2], "iscrowd": 1},
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [4, 0, 4, 8], "iscrowd": 0, "attribute_ids": [2]},
    ]
    reader = CocoInstancesReader(tmp_path / "img")
    one, two = reader.read(instances_file(tmp_path, annotations))
    assert reader.class_names == ["person", "car", "dog"]  # ordered by category id
    assert reader.attribute_names == ["small", "red"]
    assert (one.image_id, one.image_path, one.width, one.height) == (1, tmp_path / "img" / "a.png", 64, 32)
    # x=8,y=4,w=16,h=8 in 64x32 → cx=16/64, cy=8/32, w=16/64, h=8/32
    assert one.boxes == [[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 1.0, 1.0]]
    assert one.labels == [2, 0] and one.attributes == [1, -1]
    assert two.boxes == [[0.375, 0.25, 0.25, 0.5]] and two.labels == [1] and two.attributes == [0]
    assert reader.dropped == {"iscrowd box": 1} and not reader.skipped


def test_coco_instances_bad_annotations(tmp_path):
    annotations = [
        {"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1], "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "iscrowd": 0},
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "iscrowd": 0},
    ]
    path = instances_file(tmp_path, annotations)
    with pytest.raises(DataError, match=r"instances_val2017\.json: record #0 \(image_id=5\): unknown image id"):
        CocoInstancesReader(tmp_path).read(path)
    reader = CocoInstancesReader(tmp_path, skip_bad=True)
    records = reader.read(path)
    assert records[0].boxes == [[2 / 64, 2 / 32, 4 / 64, 4 / 32]]
    assert reader.skipped == {
        "unknown image id": 1,
        "missing field 'bbox'": 1,
        "unknown category id": 1,
        "bbox must have 4 numbers": 1,
    }


# ---------------------------------------------------------------- Visual Genome


def vg_files(tmp_path, objects):
    image_data = [
        {"image_id": 1, "width": 100, "height": 50, "url": "http://x/1.jpg"},
        {"image_id": 2, "width": 10, "height": 10, "url": "http://x/2.jpg"},
    ]
    attributes = [
        {
            "image_id": 1,
            "attributes": [
                {
                    "object_id": 11,
                    "x": 10,
                    "y": 5,
                    "w": 20,
                    "h": 10,
                    "names": ["tree"],
                    "attributes": ["tall", "Green "],
                },
                {"object_id": 12, "x": 0, "y": 0, "w": 100, "h": 50, "names": ["sky"], "attributes": ["cloudy"]},
            ],
        }
    ]
    return (
        write_json(tmp_path / "objects.json", objects),
        write_json(tmp_path / "attributes.json", attributes),
        write_json(tmp_path / "image_data.json", image_data),
    )


def test_visual_genome_vocab_mapping(tmp_path):
    objects = [
        {
            "image_id": 1,
            "objects": [
                {"object_id": 11, "x": 10, "y": 5, "w": 20, "h": 10, "names": ["Tree "]},
                {"object_id": 12, "x": 0, "y": 0, "w": 100, "h": 50, "names": ["sky"]},
                {"object_id": 13, "x": 50, "y": 25, "w": 10, "h": 10, "names": ["unicorn", "man"]},
                {"object_id": 14, "x": 1, "y": 1, "w": 1, "h": 1, "names": ["spaceship"]},
            ],
        },
        {"image_id": 2, "objects": []},
    ]
    reader = VisualGenomeReader(tmp_path / "vg", ["man", "sky", "tree"], ["green", "tall"])
    one, two = reader.read(*vg_files(tmp_path, objects))
    assert one.image_path == tmp_path / "vg" / "1.jpg" and (one.width, one.height) == (100, 50)
    assert one.boxes == [[0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0], [0.55, 0.6, 0.1, 0.2]]
    assert one.labels == [2, 1, 0]
    assert one.attributes == [1, -1, -1]  # "tall" comes first; "cloudy" is out of vocab; 13 has none
    assert two.boxes == [] and two.labels == [] and two.attributes == []
    assert reader.dropped == {"object not in object_vocab": 1}


def test_visual_genome_bad_records(tmp_path):
    objects = [
        {"image_id": 3, "objects": []},
        {"image_id": 1, "objects": [{"object_id": 11, "x": 10, "y": 5, "w": 20, "names": ["tree"]}]},
        {"image_id": 2, "objects": []},
    ]
    files = vg_files(tmp_path, objects)
    with pytest.raises(DataError, match=r"objects\.json: record #0 \(image_id=3\): unknown image id"):
        VisualGenomeReader(tmp_path, ["tree"], []).read(*files)
    reader = VisualGenomeReader(tmp_path, ["tree"], [], skip_bad=True)
    assert [r.image_id for r in reader.read(*files)] == [2]
    assert reader.skipped == {"unknown image id": 1, "missing field 'h'": 1}
    make_png(tmp_path / "2.jpg")
    clean = write_json(tmp_path / "objects_ok.json", [{"image_id": 2, "objects": []}, {"image_id": 1, "objects": []}])
    with pytest.raises(DataError, match=r"objects_ok\.json: record #1 \(image_id=1\): missing image file.*1\.jpg"):
        VisualGenomeReader(tmp_path, ["tree"], [], check_images=True).read(clean, None, files[2])


def test_visual_genome_vocab_synonyms_and_files(tmp_path):
    vocab_file = tmp_path / "objects_vocab.txt"
    vocab_file.write_text("man\nstop sign,stopsign\n\ntree\n")
    vocab = read_vocab(vocab_file)
    assert vocab == ["man", "stop sign,stopsign", "tree"]
    objects = [{"image_id": 1, "objects": [
        {"object_id": 11, "x": 10, "y": 5, "w": 20, "h": 10, "names": ["StopSign"]},
        {"object_id": 12, "x": 0, "y": 0, "w": 100, "h": 50, "names": ["stop  sign"]}]}, {"image_id": 2, "objects": []}]
    one, _ = VisualGenomeReader(tmp_path, vocab, []).read(*vg_files(tmp_path, objects))
    assert one.labels == [1, 1]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match=r"empty\.txt: empty vocabulary"):
        read_vocab(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="missing.txt: file not found"):
        read_vocab(tmp_path / "missing.txt")


def test_visual_genome_region_phrases_become_captions(tmp_path):
    _, _, image_data = vg_files(tmp_path, [])
    regions = [
        {"id": 1, "regions": [{"region_id": 1, "image_id": 1, "phrase": " a tall  tree "},
                              {"region_id": 2, "image_id": 1, "phrase": "A tall tree"},
                              {"region_id": 3, "image_id": 1, "phrase": "blue sky"}]},
        {"id": 2, "regions": [{"region_id": 4, "image_id": 2, "phrase": "  "}]},
    ]
    reader = VisualGenomeRegionsReader(tmp_path / "vg")
    (record,) = reader.read(write_json(tmp_path / "regions.json", regions), image_data)
    assert record.image_id == 1 and record.image_path == tmp_path / "vg" / "1.jpg"
    assert record.captions == ["a tall tree", "blue sky"] and (record.width, record.height) == (100, 50)
    assert reader.dropped == {"image without a region phrase": 1}
    unknown = write_json(tmp_path / "unknown.json", [{"id": 7, "regions": []}])
    with pytest.raises(DataError, match=r"unknown\.json: record #0 \(id=7\): unknown image id"):
        reader.read(unknown, image_data)


# ---------------------------------------------------------------- VQA v2


def test_answer_scores_hand_checked():
    assert answer_scores(["2"] * 3 + ["two"] * 2 + ["3"] * 5) == {"2": 1.0, "3": 1.0}
    scores = answer_scores(["yes"] * 2 + ["no"] * 8)
    assert scores["yes"] == pytest.approx(2 / 3) and scores["no"] == 1.0
    assert answer_scores(["red"] + ["blue"] * 9)["red"] == pytest.approx(1 / 3)


def vqa_files(tmp_path, questions=None, annotations=None):
    questions = questions or [
        {"image_id": 1, "question": "How many?", "question_id": 100},
        {"image_id": 2, "question": "Is it red?", "question_id": 200},
    ]
    annotations = annotations or [
        {
            "question_id": 100,
            "image_id": 1,
            "multiple_choice_answer": "two",
            "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["2"] * 3 + ["two"] * 2 + ["3"] * 5)],
        },
        {
            "question_id": 200,
            "image_id": 2,
            "multiple_choice_answer": "no",
            "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["yes"] * 2 + ["no"] * 8)],
        },
    ]
    return (
        write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": questions}),
        write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": annotations}),
    )


def test_vqa_records_and_targets(tmp_path):
    questions, annotations = vqa_files(tmp_path)
    vocab = build_answer_vocab([annotations], min_count=1)
    assert vocab == ["2", "no"]  # ties ranked alphabetically
    assert build_answer_vocab([annotations], top_k=1) == ["2"]
    assert build_answer_vocab([annotations], min_count=2) == []
    image_paths = coco_image_paths(captions_file(tmp_path), tmp_path / "coco")
    reader = VQAReader(image_paths, vocab + ["yes", "3"])
    first, second = reader.read(questions, annotations)
    assert (first.question_id, first.image_id, first.question) == (100, 1, "How many?")
    assert first.image_path == tmp_path / "coco" / "a.png" and second.image_path == tmp_path / "coco" / "b.png"
    assert first.answers == ["2"] * 3 + ["two"] * 2 + ["3"] * 5 and first.multiple_choice_answer == "2"
    assert first.target == {0: 1.0, 3: 1.0}
    assert second.target == {1: 1.0, 2: pytest.approx(2 / 3)}
    assert build_answer_vocab([first, second], min_count=1) == ["2", "no"]


def test_vqa_test_split_without_annotations(tmp_path):
    questions, _ = vqa_files(tmp_path)
    records = VQAReader(lambda i: tmp_path / f"COCO_test2015_{i:012d}.jpg", ["2"]).read(questions)
    assert [(r.answers, r.multiple_choice_answer, r.target) for r in records] == [(None, None, None)] * 2
    assert records[1].image_path == tmp_path / "COCO_test2015_000000000002.jpg"


def test_vqa_bad_records(tmp_path):
    questions = [
        {"image_id": 1, "question": "ok?", "question_id": 100},
        {"image_id": 7, "question": "unknown image?", "question_id": 300},
        {"image_id": 2, "question_id": 200},
        {"image_id": 1, "question": "no annotation?", "question_id": 400},
    ]
    annotations = [
        {"question_id": 100, "image_id": 1, "multiple_choice_answer": "yes", "answers": [{"answer": "yes"}]},
        {"question_id": 300, "image_id": 7, "multiple_choice_answer": "no", "answers": [{"answer": "no"}]},
        {"question_id": 200, "image_id": 2, "answers": [{"answer": "no"}]},
    ]
    files = vqa_files(tmp_path, questions, annotations)
    paths = {1: tmp_path / "1.png", 2: tmp_path / "2.png"}
    with pytest.raises(DataError, match=r"annotations\.json: record #2 \(question_id=200\): missing field"):
        VQAReader(paths).read(*files)
    reader = VQAReader(paths, ["yes"], skip_bad=True)
    assert [r.question_id for r in reader.read(*files)] == [100]
    assert reader.skipped == {
        "missing field 'multiple_choice_answer'": 1,
        "unknown image id": 1,
        "missing field 'question'": 1,
        "question has no annotation": 1,
    }
    make_png(paths[1])
    two_images = [questions[0], {"image_id": 2, "question": "q", "question_id": 400}]
    only_images = write_json(tmp_path / "questions.json", {"questions": two_images})
    with pytest.raises(DataError, match=r"questions\.json: record #1 \(question_id=400\): missing image file.*2\.png"):
        VQAReader({1: paths[1], 2: paths[2]}, check_images=True).read(only_images)


# ---------------------------------------------------------------- NLVR2


def test_nlvr2_records_and_image_naming(tmp_path):
    lines = [
        {"identifier": "dev-850-0-0", "sentence": "Two dogs.", "label": "True", "writer": "7"},
        {"identifier": "train-10171-0-3", "sentence": "One cat.", "label": "False", "directory": 46},
        {"identifier": "test1-0-1-2", "sentence": "Hidden."},
    ]
    path = tmp_path / "dev.json"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    dev, train, test = NLVR2Reader(tmp_path / "img").read(path)
    assert (dev.identifier, dev.sentence, dev.label) == ("dev-850-0-0", "Two dogs.", True)
    assert dev.left_path == tmp_path / "img" / "dev-850-0-img0.png"
    assert dev.right_path == tmp_path / "img" / "dev-850-0-img1.png"
    assert train.label is False and train.right_path == tmp_path / "img" / "46" / "train-10171-0-img1.png"
    assert test.label is None and test.left_path == tmp_path / "img" / "test1-0-1-img0.png"


def test_nlvr2_bad_lines(tmp_path):
    path = tmp_path / "dev.json"
    good = {"identifier": "dev-1-0-0", "sentence": "ok", "label": "True"}
    path.write_text(
        "\n".join(
            [
                json.dumps(good),
                "{not json",
                json.dumps({"identifier": "dev-2-0-0", "label": "False"}),
                json.dumps({"identifier": "dev-3-0-0", "sentence": "s", "label": "maybe"}),
            ]
        )
    )
    with pytest.raises(DataError, match=r"dev\.json: record #1: malformed JSON: line 2"):
        NLVR2Reader(tmp_path).read(path)
    reader = NLVR2Reader(tmp_path, skip_bad=True)
    assert [r.identifier for r in reader.read(path)] == ["dev-1-0-0"]
    assert reader.skipped == {"malformed JSON": 1, "missing field 'sentence'": 1, "label is not 'True' or 'False'": 1}
    path.write_text(json.dumps(good))
    make_png(tmp_path / "dev-1-0-img0.png")
    make_corrupt(tmp_path / "dev-1-0-img1.png")
    with pytest.raises(DataError, match=r"dev\.json.*corrupt image file.*dev-1-0-img1\.png"):
        NLVR2Reader(tmp_path, check_images=True).read(path)
    make_png(tmp_path / "dev-1-0-img1.png")
    assert len(NLVR2Reader(tmp_path, check_images=True).read(path)) == 1


# ---------------------------------------------------------------- Karpathy splits


def karpathy_file(tmp_path, images):
    return write_json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": images})


def karpathy_image(imgid, split, filepath="val2014"):
    item = {
        "filename": f"{imgid}.jpg",
        "imgid": imgid,
        "split": split,
        "sentences": [{"raw": f"Caption {imgid}.", "tokens": ["caption", str(imgid)], "sentid": 10 * imgid}],
    }
    if filepath is not None:
        item["filepath"] = filepath
    return item


def test_karpathy_splits_and_restval(tmp_path):
    path = karpathy_file(
        tmp_path,
        [
            karpathy_image(0, "train", "train2014"),
            karpathy_image(1, "restval"),
            karpathy_image(2, "test"),
            karpathy_image(3, "val", None),
        ],
    )
    reader = KarpathyReader(tmp_path / "coco")
    assert [r.image_id for r in reader.read(path, "train")] == [0]
    train = reader.read(path, "train", merge_restval=True)
    assert [(r.image_id, r.split) for r in train] == [(0, "train"), (1, "restval")]
    assert train[0].image_path == tmp_path / "coco" / "train2014" / "0.jpg"
    (test,) = reader.read(path, "test")
    assert (test.captions, test.tokens, test.sentence_ids) == (["Caption 2."], [["caption", "2"]], [20])
    (val,) = reader.read(path, "val")
    assert val.image_path == tmp_path / "coco" / "3.jpg"  # Flickr30K style: no filepath
    with pytest.raises(ValueError, match="split"):
        reader.read(path, "dev")


def test_karpathy_bad_records(tmp_path):
    broken = karpathy_image(1, "test")
    del broken["sentences"][0]["sentid"]
    path = karpathy_file(tmp_path, [karpathy_image(0, "test"), broken, {"imgid": 2, "split": "test"}])
    with pytest.raises(DataError, match=r"dataset_coco\.json: record #1 \(imgid=1\): missing field 'sentid'"):
        KarpathyReader(tmp_path).read(path, "test")
    reader = KarpathyReader(tmp_path, skip_bad=True)
    assert [r.image_id for r in reader.read(path, "test")] == [0]
    assert reader.skipped == {"missing field 'sentid'": 1, "missing field 'filename'": 1}
