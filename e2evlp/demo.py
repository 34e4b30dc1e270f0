"""The embedded default: synthetic shapes data → evaluate the untrained tiny model → pre-train → fine-tune VQA briefly
→ evaluate again → results.json, a table and a picture."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from e2evlp.data.synthetic import write_synthetic_dataset
from e2evlp.demo_config import DemoConfig
from e2evlp.devices import device_name
from e2evlp.eval.metrics import vqa_accuracy
from e2evlp.io import atomic_write
from e2evlp.models import E2EVLPForVQA
from e2evlp.models.text import load_tokenizer
from e2evlp.train.recipes import (
    answer_vocab,
    build_collator,
    build_dataset,
    build_model,
    evaluate_task,
    train_loader,
)
from e2evlp.train.run_config import validate
from e2evlp.train.trainer import Trainer, TrainerConfig

METRICS = ("vqa_acc", "itm_acc", "det_ap50", "caption_bleu4", "caption_cider")


def run_configs(summary: dict, out: Path, demo: DemoConfig) -> dict[str, dict]:
    """The pre-training and VQA run configs (the schema of configs/*.yaml) over the synthetic files."""
    paths = summary["paths"]

    def coco(split):
        return {"images": paths[split]["images"], "captions": paths[split]["captions"],
                "instances": paths[split]["instances"]}

    def vqa(split):
        return {"images": paths[split]["images"], "image_index": paths[split]["captions"],
                "questions": paths[split]["vqa_questions"], "annotations": paths[split]["vqa_annotations"]}

    model = {"preset": "tiny", "config": {"num_classes": len(summary["classes"]),
                                          "num_attributes": len(summary["attributes"]),
                                          "hidden_dropout_prob": 0.0, "attention_dropout_prob": 0.0}}
    # One scale, the images' own: every image is drawn at the same size, so scale jitter would only slow learning.
    shorter = min(demo.image_size)
    image = {"train_min": shorter, "train_max": shorter, "train_step": 16, "max_longer": max(demo.image_size),
             "eval": shorter}
    # A few hundred small images: decode each once and keep it (workers would compete for the 2 cores anyway).
    data = {"batch_size": demo.batch_size, "eval_batch_size": 64, "num_workers": demo.num_workers, "image": image,
            "cache_images": True}
    train = {"lr": demo.lr, "backbone_lr": demo.lr, "weight_decay": 0.01, "seed": demo.seed, "max_grad_norm": 1.0}
    pretrain = {"model": model, "tokenizer": paths["tokenizer"], "data": {**data, "train": coco("train"),
                                                                        "val": coco("val")},
                "train": {**train, "output_dir": str(out / "pretrain"), "max_steps": demo.steps,
                          "warmup_steps": demo.steps // 20, "save_every": 0}}
    finetune = {"model": model, "tokenizer": paths["tokenizer"], "data": {**data, "train": vqa("train"),
                                                                        "val": vqa("val")},
                "train": {**train, "output_dir": str(out / "vqa"), "max_steps": demo.vqa_steps,
                          "warmup_steps": demo.vqa_steps // 10, "save_every": 0}}
    return {"pretrain": validate(pretrain), "vqa": validate(finetune)}


def _train(model, config: dict, task: str, tokenizer, answers=None) -> dict:
    dataset = build_dataset(task, config, "train", train=True, answers=answers, seed=config["train"]["seed"])
    collator = build_collator(task, model.config, tokenizer, train=True, seed=config["train"]["seed"])
    loader = train_loader(dataset, collator, config, seed=config["train"]["seed"])
    # Each demo trains from scratch: a previous demo's checkpoints in this folder are not this run's.
    shutil.rmtree(config["train"]["output_dir"], ignore_errors=True)
    return Trainer(model, TrainerConfig(**config["train"], resume=False), loader).train()


def _pretraining_metrics(model, configs: dict, tokenizer) -> dict[str, float]:
    return evaluate_task("pretrain", model, configs["pretrain"], "val", tokenizer)


def _vqa_model(pretrained) -> E2EVLPForVQA:
    """A VQA model with a fresh answer head on a copy of the pre-trained trunk (fine-tuning leaves it intact)."""
    vqa = E2EVLPForVQA(pretrained.config)
    vqa.model.load_state_dict(pretrained.model.state_dict())
    return vqa


def majority_baseline(configs: dict, answers: list[str], tokenizer) -> dict:
    """The VQA accuracy of always giving the most frequent train answer."""
    train = build_dataset("vqa", configs["vqa"], "train", train=False, answers=answers)
    top = Counter(record.multiple_choice_answer for record in train.records).most_common(1)[0][0]
    val = build_dataset("vqa", configs["vqa"], "val", train=False, answers=answers)
    accuracy = vqa_accuracy({r.question_id: top for r in val.records}, {r.question_id: r.answers for r in val.records})
    return {"vqa_majority_answer": top, "vqa_majority_acc": accuracy}


def run_demo(out_dir: str | Path = "demo-output", *, demo: DemoConfig | None = None, draw: bool = True) -> dict:
    """Runs the whole demo and writes ``out_dir/results.json`` (and ``demo.png``); returns the results."""
    demo = demo or DemoConfig()
    start = time.time()
    out = Path(out_dir)
    summary = write_synthetic_dataset(out / "data", num_train=demo.num_train, num_val=demo.num_val,
                                      image_size=demo.image_size, seed=demo.seed)
    configs = run_configs(summary, out, demo)
    tokenizer = load_tokenizer(summary["paths"]["tokenizer"])
    answers = answer_vocab(configs["vqa"], num_answers=64)
    torch.manual_seed(demo.seed)
    pretrained = build_model("pretrain", configs["pretrain"], tokenizer, num_answers=len(answers))
    vqa = _vqa_model(pretrained)
    before = _pretraining_metrics(pretrained, configs, tokenizer)
    before |= evaluate_task("vqa", vqa, configs["vqa"], "val", tokenizer, answers=answers)
    pretrain_summary = _train(pretrained, configs["pretrain"], "pretrain", tokenizer)
    after = _pretraining_metrics(pretrained, configs, tokenizer)
    vqa = _vqa_model(pretrained)
    vqa_summary = _train(vqa, configs["vqa"], "vqa", tokenizer, answers)
    after |= evaluate_task("vqa", vqa, configs["vqa"], "val", tokenizer, answers=answers)
    results = {
        "before": {key: before[key] for key in METRICS},
        "after": {key: after[key] for key in METRICS},
        "baseline": majority_baseline(configs, answers, tokenizer),
        "vqa_method": f"VQA head fine-tuned for {demo.vqa_steps} steps on the pre-trained trunk (before: untrained "
                      "trunk and head)",
        "steps": {"pretrain": pretrain_summary["steps"], "vqa": vqa_summary["steps"]},
        "throughput": {"pretrain_samples_per_s": pretrain_summary.get("samples_per_s")},
        "seconds": round(time.time() - start, 1),
        "device": device_name("cuda" if torch.cuda.is_available() else "cpu"),
        "data": summary["counts"],
    }
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2) + "\n"))
    if draw:
        from e2evlp.demo_picture import draw_predictions

        results["picture"] = str(draw_predictions(pretrained, configs["pretrain"], tokenizer, summary,
                                                  out / "demo.png"))
    return results


def results_table(results: dict) -> str:
    """A Markdown table: each metric before and after training, with the VQA majority baseline."""
    rows = ["| metric | before | after |", "|---|---|---|"]
    for key in METRICS:
        rows.append(f"| {key} | {results['before'][key]:.3f} | {results['after'][key]:.3f} |")
    rows.append(f"| vqa_majority_acc (baseline) | {results['baseline']['vqa_majority_acc']:.3f} | |")
    return "\n".join(rows)
