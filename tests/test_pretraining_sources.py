"""Pre-training data from COCO-format and Visual Genome sources: captions, boxes joined per source, one vocabulary."""

import json
from pathlib import Path

import pytest

from e2evlp.data.datasets import PretrainingDataset
from e2evlp.models import E2EVLPConfig
from e2evlp.train.recipes import check_detection_labels, pretraining_records
from tests.test_readers import captions_file, instances_file, make_png, vg_files, write_json


def sources(tmp_path):
    """A COCO captions source and a Visual Genome source whose image ids (1, 2) collide with COCO's."""
    coco = {"images": str(tmp_path / "img"), "captions": str(captions_file(tmp_path))}
    objects = [{"image_id": 1, "objects": [{"object_id": 11, "x": 10, "y": 5, "w": 20, "h": 10, "names": ["tree"]}]},
               {"image_id": 2, "objects": []}]
    objects_file, attributes_file, image_data = vg_files(tmp_path, objects)
    regions = write_json(tmp_path / "regions.json", [{"id": 1, "regions": [{"phrase": "a tall tree"}]}])
    (tmp_path / "objects_vocab.txt").write_text("man\ntree\n")
    (tmp_path / "attributes_vocab.txt").write_text("green\ntall\n")
    vg = {"images": str(tmp_path / "vg"), "image_data": str(image_data), "regions": str(regions),
          "objects": str(objects_file), "attributes": str(attributes_file),
          "object_vocab": str(tmp_path / "objects_vocab.txt"),
          "attribute_vocab": str(tmp_path / "attributes_vocab.txt")}
    for path in (tmp_path / "img" / "a.png", tmp_path / "img" / "b.png", tmp_path / "vg" / "1.jpg"):
        make_png(path)
    return coco, vg


def test_boxes_join_their_own_source_even_when_image_ids_collide(tmp_path):
    coco, vg = sources(tmp_path)
    dataset = PretrainingDataset(*pretraining_records({"train": [coco, vg]}, "train"))
    items = [dataset[i] for i in range(len(dataset))]
    assert sorted(item["text"] for item in items) == ["A red square.", "Another one.", "Red.", "a tall tree"]
    for item in items:
        if item["text"] == "a tall tree":  # Visual Genome image 1: its tree, class 1, attribute "tall"
            assert item["labels"].tolist() == [1] and item["attributes"].tolist() == [1]
        else:  # COCO images 1 and 2 have captions only: no Visual Genome box may leak into them
            assert item["labels"].numel() == 0
    assert dataset.label_bounds() == (2, 2)
    check_detection_labels(dataset, E2EVLPConfig.tiny())
    with pytest.raises(ValueError, match="num_classes=1 and num_attributes=8: set model.config.num_classes"):
        check_detection_labels(dataset, E2EVLPConfig.tiny(num_classes=1))


def test_one_detection_vocabulary_and_complete_visual_genome_sources(tmp_path):
    coco, vg = sources(tmp_path)
    coco["instances"] = str(instances_file(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 8, 8], "iscrowd": 0}]))
    with pytest.raises(ValueError, match="data.train mixes detection vocabularies"):
        pretraining_records({"train": [coco, vg]}, "train")
    once = pretraining_records({"train": [coco]}, "train")[1]
    assert len(pretraining_records({"train": [coco, coco]}, "train")[1]) == 2 * len(once)  # one vocabulary: fine
    renamed = json.loads(Path(coco["instances"]).read_text())
    renamed["categories"][0]["name"] = "bicycle"
    other = {**coco, "instances": str(write_json(tmp_path / "other_instances.json", renamed))}
    with pytest.raises(ValueError, match="data.train mixes detection vocabularies"):
        pretraining_records({"train": [coco, other]}, "train")
    with pytest.raises(ValueError, match="a Visual Genome source needs 'regions'"):
        pretraining_records({"train": [{key: v for key, v in vg.items() if key != "regions"}]}, "train")
    with pytest.raises(ValueError, match="needs 'object_vocab'"):
        pretraining_records({"train": [{key: v for key, v in vg.items() if key != "object_vocab"}]}, "train")
    captions, detections = pretraining_records({"train": [{key: v for key, v in vg.items() if key != "objects"}]},
                                               "train")
    assert [r.captions for r in captions] == [["a tall tree"]] and detections == []
