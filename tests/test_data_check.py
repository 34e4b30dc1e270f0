"""`e2evlp data check`: every image a task's split reads is decoded before training, and the bad ones listed."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from e2evlp import cli
from e2evlp.data.check import bad_images, image_files
from e2evlp.data.readers_nlvr2 import NLVR2Record
from e2evlp.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(root, num_train=6, num_val=2, image_size=(32, 32), seed=2)


def _config(tmp_path, synthetic, data: dict) -> Path:
    config = {"model": {"preset": "tiny"}, "tokenizer": synthetic["paths"]["tokenizer"],
              "data": {"num_workers": 0, **data},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_corrupt_and_a_missing_image_are_listed_and_fail_the_check(synthetic, tmp_path, capsys):
    train = synthetic["paths"]["train"]
    images = tmp_path / "images"
    shutil.copytree(train["images"], images)
    config = _config(tmp_path, synthetic, {"train": [{"images": str(images), "captions": train["captions"],
                                                      "instances": train["instances"]}]})
    assert cli.main(["data", "check", "pretrain", "--config", str(config), "--workers", "2"]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert clean["bad"] == [] and clean["images"] == len(list(images.iterdir())) == 6

    files = sorted(images.iterdir())
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])  # truncated: the header reads, the pixels do not
    files[4].unlink()
    assert cli.main(["data", "check", "pretrain", "--config", str(config)]) == 1
    result = json.loads(capsys.readouterr().out)
    assert [Path(bad["file"]) for bad in result["bad"]] == [files[1], files[4]]
    assert "cannot decode" in result["bad"][0]["error"] and "not found" in result["bad"][1]["error"]


def test_vqa_images_shared_by_questions_are_decoded_once(synthetic, tmp_path, capsys):
    train = synthetic["paths"]["train"]
    config = _config(tmp_path, synthetic, {"answers": 12, "train": [
        {"images": train["images"], "image_index": train["captions"], "questions": train["vqa_questions"],
         "annotations": train["vqa_annotations"]}]})
    assert cli.main(["data", "check", "vqa", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6


def test_image_files_dedupes_in_order_and_reads_both_nlvr2_images(tmp_path):
    left, right, other = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    records = [NLVR2Record("x", "s", left, right, True), NLVR2Record("y", "s", right, other, False)]
    assert image_files(records) == [left, right, other]


def test_bad_images_keeps_the_order_of_its_input_whatever_the_workers(tmp_path):
    paths = []
    for i in range(9):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8)).save(path)
        if i % 3 == 0:
            path.write_bytes(b"not an image")
        paths.append(path)
    for workers in (1, 4):
        assert [path for path, _ in bad_images(paths, workers=workers, progress=False)] == paths[::3]
    assert bad_images([], progress=False) == []
