"""The training commands end to end on a very short synthetic run: pretrain → evaluate → finetune → caption, demo."""

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from e2evlp import cli
from e2evlp.data.synthetic import write_synthetic_dataset
from e2evlp.eval import normalize_answer, vqa_accuracy
from e2evlp.models.text import load_tokenizer
from e2evlp.train.recipes import TASK_MODELS, build_collator, build_dataset, eval_loader, load_answer_vocab
from e2evlp.train.run_config import RunConfigError, apply_overrides, load_run_config, parse_override

TINY = {"num_classes": 3, "num_attributes": 4, "hidden_dropout_prob": 0.0, "attention_dropout_prob": 0.0}


@pytest.fixture(autouse=True)
def sdpa_attention(monkeypatch):
    # The Triton interpreter is exact but slow; these tests exercise the plumbing, not the kernel.
    monkeypatch.setenv("E2EVLP_ATTENTION", "sdpa")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(root, num_train=8, num_val=4, image_size=(64, 64), seed=1)


def _coco(paths, split):
    p = paths[split]
    return {"images": p["images"], "captions": p["captions"], "instances": p["instances"]}


def _vqa(paths, split):
    p = paths[split]
    return {"images": p["images"], "image_index": p["captions"], "questions": p["vqa_questions"],
            "annotations": p["vqa_annotations"]}


def _write_config(path: Path, summary: dict, data: dict, output_dir: Path, **model) -> Path:
    config = {"model": {"preset": "tiny", "config": TINY, **model}, "tokenizer": summary["paths"]["tokenizer"],
              "data": {"batch_size": 4, "eval_batch_size": 8, "num_workers": 0, **data},
              "train": {"output_dir": str(output_dir), "max_steps": 2, "lr": 1e-3, "progress": False,
                        "log_every": 1}}
    path.write_text(yaml.safe_dump(config))
    return path


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


@torch.no_grad()
def _val_predictions(task: str, config_path: Path, checkpoint: Path) -> dict:
    """The checkpoint's top class per val example (by question id or NLVR2 identifier), run here, not by eval."""
    config = load_run_config(config_path)
    model = TASK_MODELS[task].from_pretrained(checkpoint).eval()
    answers = load_answer_vocab(checkpoint) if task == "vqa" else None
    collator = build_collator(task, model.config, load_tokenizer(checkpoint), train=False)
    loader = eval_loader(build_dataset(task, config, "val", train=False, answers=answers), collator, config)
    predictions = {}
    for batch in loader:
        logits = model(**{k: batch[k] for k in ("pixel_values", "pixel_mask", "input_ids", "attention_mask")}).logits
        keys = batch["question_ids"] if task == "vqa" else batch["identifiers"]
        predictions.update(zip(keys, logits.argmax(-1).tolist()))
    return predictions


def _log_records(output_dir: Path) -> list[dict]:
    """The step records of a run's log.jsonl (not its events or its eval line)."""
    lines = (json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines())
    return [record for record in lines if "step" in record and "event" not in record]


def _vqa_annotations(path) -> dict[int, list[str]]:
    """Question id → the raw annotator answers, straight from a VQA v2 annotation file."""
    items = json.loads(Path(path).read_text())["annotations"]
    return {item["question_id"]: [a["answer"] for a in item["answers"]] for item in items}


def test_pretrain_evaluate_finetune_caption(synthetic, tmp_path, capsys):
    paths = synthetic["paths"]
    pretrain_config = _write_config(tmp_path / "pretrain.yaml", synthetic,
                                    {"train": [_coco(paths, "train")], "val": [_coco(paths, "val")]},
                                    tmp_path / "pretrain")
    assert cli.main(["pretrain", "--config", str(pretrain_config), "train.max_steps=3", "data.batch_size=2"]) == 0
    summary = _json_out(capsys)
    assert summary["steps"] == 3 and summary["stopped"] == "done"
    assert set(summary["eval"]) >= {"itm_acc", "det_ap50", "caption_bleu4", "caption_cider"}
    final = Path(summary["final"])
    assert {"model.safetensors", "config.json", "run_config.yaml"} <= {p.name for p in final.iterdir()}
    log = [json.loads(line) for line in (tmp_path / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert any("samples_per_s" in record for record in log) and "eval" in log[-1]

    assert cli.main(["evaluate", "detection", "--config", str(pretrain_config), "--checkpoint", str(final)]) == 0
    assert set(_json_out(capsys)) == {"det_ap", "det_ap50"}

    vqa_config = _write_config(tmp_path / "vqa.yaml", synthetic,
                               {"train": [_vqa(paths, "train")], "val": [_vqa(paths, "val")], "answers": 12},
                               tmp_path / "vqa", init=str(tmp_path / "pretrain"))
    # No tokenizer in the config: the one exported with model.init (the pre-training run's final/) is used.
    assert cli.main(["finetune", "vqa", "--config", str(vqa_config), "tokenizer=null"]) == 0
    vqa_summary = _json_out(capsys)
    assert vqa_summary["new_heads"] == ["vqa_head"]  # the pre-trained trunk has no VQA head
    records = _log_records(tmp_path / "vqa")
    assert records and all("losses" not in record for record in records)  # one task: its loss is "loss"
    vqa_final = Path(vqa_summary["final"])
    answers = json.loads((vqa_final / "answer_vocab.json").read_text())
    predicted = {q: answers[i] for q, i in _val_predictions("vqa", vqa_config, vqa_final).items()}
    annotations = _vqa_annotations(paths["val"]["vqa_annotations"])
    assert predicted.keys() == annotations.keys()
    assert vqa_summary["eval"]["vqa_acc"] == pytest.approx(vqa_accuracy(predicted, annotations))
    assert len(answers) <= 12
    # A run folder resolves to its final/ export, which holds the tokenizer and the answer list.
    assert cli.main(["evaluate", "vqa", "--config", str(vqa_config), "--checkpoint", str(tmp_path / "vqa")]) == 0
    assert _json_out(capsys)["vqa_acc"] == pytest.approx(vqa_summary["eval"]["vqa_acc"])
    assert re.search("data.answers=3 but .* was trained on", cli_error(capsys, [
        "finetune", "vqa", "--config", str(vqa_config), f"model.init={vqa_final}", "data.answers=3",
        f"train.output_dir={tmp_path / 'vqa2'}"]))
    assert "no trained nlvr2 head" in cli_error(capsys, ["evaluate", "nlvr2", "--config", str(vqa_config),
                                                         "--checkpoint", str(vqa_final)])

    images = sorted(Path(paths["val"]["images"]).glob("*.png"))[:2]
    assert cli.main(["caption", *map(str, images), "--checkpoint", str(final), "--num-beams", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]


def test_finetune_nlvr2_and_retrieval(synthetic, tmp_path, capsys):
    paths = synthetic["paths"]
    # The first dev pair only: the dev labels are balanced, so any constant answer would score exactly 0.5 on
    # them and a swapped label or prediction would go unseen.
    val_file = tmp_path / "dev-first-pair.json"
    val_file.write_text(Path(paths["val"]["nlvr2"]).read_text().splitlines()[0] + "\n")
    nlvr2 = {"train": [{"images": paths["train"]["nlvr2_images"], "file": paths["train"]["nlvr2"]}],
             "val": [{"images": paths["val"]["nlvr2_images"], "file": str(val_file)}]}
    config = _write_config(tmp_path / "nlvr2.yaml", synthetic, nlvr2, tmp_path / "nlvr2")
    assert cli.main(["finetune", "nlvr2", "--config", str(config), "data.batch_size=2"]) == 0
    nlvr2_summary = _json_out(capsys)
    predicted = _val_predictions("nlvr2", config, Path(nlvr2_summary["final"]))
    lines = val_file.read_text().splitlines()
    truth = {item["identifier"]: int(item["label"] == "True") for item in map(json.loads, lines)}
    assert predicted.keys() == truth.keys()
    expected = sum(predicted[key] == label for key, label in truth.items()) / len(truth)
    assert nlvr2_summary["eval"]["nlvr2_acc"] == pytest.approx(expected)

    karpathy = {"karpathy": paths["karpathy"], "images": synthetic["root"], "val_split": "test"}
    config = _write_config(tmp_path / "retrieval.yaml", synthetic, karpathy, tmp_path / "retrieval")
    assert cli.main(["finetune", "retrieval", "--config", str(config)]) == 0
    recalls = _json_out(capsys)["eval"]
    assert set(recalls) == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum"}
    config = _write_config(tmp_path / "caption.yaml", synthetic, karpathy, tmp_path / "caption")
    assert cli.main(["finetune", "caption", "--config", str(config)]) == 0
    assert "caption_cider" in _json_out(capsys)["eval"]


def test_demo_writes_results_and_picture(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--steps", "2", "--vqa-steps", "1", "--num-train", "16",
                     "--num-val", "4"]) == 0
    results = json.loads((out / "results.json").read_text())
    metrics = {"vqa_acc", "itm_acc", "det_ap50", "caption_bleu4", "caption_cider"}
    assert set(results["before"]) == set(results["after"]) == metrics
    assert results["seconds"] > 0 and results["device"]
    # The baseline, from the raw files: a most frequent train answer given to every val question.
    vqa_files = out / "data" / "vqa"
    train_answers = Counter(normalize_answer(item["multiple_choice_answer"]) for item in json.loads(
        (vqa_files / "v2_mscoco_train2014_annotations.json").read_text())["annotations"])
    majority = results["baseline"]["vqa_majority_answer"]
    assert train_answers[majority] == max(train_answers.values())
    val = _vqa_annotations(vqa_files / "v2_mscoco_val2014_annotations.json")
    assert results["baseline"]["vqa_majority_acc"] == pytest.approx(vqa_accuracy(dict.fromkeys(val, majority), val))
    assert (out / "demo.png").stat().st_size > 0
    assert "| itm_acc |" in capsys.readouterr().out


def test_overrides_keep_yaml_types_and_reject_unknown_keys(tmp_path):
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("data.train=[1, 2]") == (["data", "train"], [1, 2])
    assert apply_overrides({"train": {"lr": 1}}, ["train.seed=5", "model.config.hidden_size=32"]) == {
        "train": {"lr": 1, "seed": 5}, "model": {"config": {"hidden_size": 32}}}
    with pytest.raises(RunConfigError, match="section.key=value"):
        parse_override("lr")
    with pytest.raises(RunConfigError, match=r"unknown key\(s\) \['lrate'\] in section 'train'"):
        load_run_config(None, ["train.lrate=1"])
    with pytest.raises(RunConfigError, match="model.preset"):
        load_run_config(None, ["model.preset=huge"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_run_config(tmp_path / "missing.yaml")


def test_shipped_configs_validate():
    configs = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"pretrain_tiny", "pretrain_small", "pretrain_base", "finetune_vqa",
                                        "finetune_nlvr2", "finetune_caption", "finetune_retrieval"}
    for path in configs:
        config = load_run_config(path)
        assert config["train"]["output_dir"] and config["train"]["max_steps"] > 0


def cli_error(capsys, argv: list[str]) -> str:
    """What `e2evlp argv` prints on stderr when it refuses its input (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_settings_are_clear_errors(tmp_path, capsys):
    config = str(_write_config(tmp_path / "c.yaml", {"paths": {"tokenizer": "x"}}, {}, tmp_path))
    assert "train.output_dir and train.max_steps" in cli_error(capsys, ["pretrain", "--config", config,
                                                                       "train.output_dir="])
    missing = str(tmp_path / "missing.yaml")
    assert "missing.yaml does not exist" in cli_error(capsys, ["pretrain", "--config", missing])


def test_runs_with_one_seed_start_alike_and_save_readable_files(synthetic, tmp_path, capsys):
    paths = synthetic["paths"]
    finals = []
    for name in ("a", "b"):
        config = _write_config(tmp_path / f"{name}.yaml", synthetic, {"train": [_coco(paths, "train")]},
                               tmp_path / name)
        assert cli.main(["pretrain", "--config", str(config), "train.max_steps=1", "data.batch_size=2",
                         "train.seed=3"]) == 0
        finals.append(Path(_json_out(capsys)["final"]) / "model.safetensors")
    assert finals[0].read_bytes() == finals[1].read_bytes()  # the seed draws the initial weights too
    umask = os.umask(0o022)
    os.umask(umask)
    assert finals[0].stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not owner-only


def test_a_run_stopped_by_sigterm_exits_143(monkeypatch, capsys):
    from e2evlp import commands
    from e2evlp.train import launch

    monkeypatch.setattr(commands, "_load_config", lambda args: {})
    for stopped, status in (("sigterm", 143), ("done", 0)):
        monkeypatch.setattr(launch, "train", lambda task, config, stopped=stopped: {"stopped": stopped})
        assert cli.main(["pretrain", "--config", "unused.yaml"]) == status
