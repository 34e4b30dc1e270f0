"""Entry points behind `e2evlp pretrain / finetune / evaluate / caption`: one process or one torchrun rank each."""

from __future__ import annotations

import json
import shlex
import warnings
from pathlib import Path

import torch
import yaml

from e2evlp.data.check import bad_images, image_files
from e2evlp.data.collate import pad_images
from e2evlp.data.readers import load_image
from e2evlp.io import atomic_write
from e2evlp.train import distributed
from e2evlp.train.recipes import (
    TASK_MODELS,
    answer_vocab,
    build_collator,
    build_dataset,
    build_model,
    captioner_of,
    check_detection_labels,
    default_device,
    evaluate_task,
    image_transforms,
    load_answer_vocab,
    resolve_checkpoint,
    save_answer_vocab,
    tokenizer_for,
    train_loader,
)
from e2evlp.train.run_config import DETR_IMAGES, TINY_IMAGES, read_yaml, validate
from e2evlp.train.trainer import Trainer, TrainerConfig

FINAL_DIR = "final"


def train(task: str, config: dict) -> dict:
    """Trains `task` ("pretrain" or a fine-tuning task) as the run config says; rank 0 exports the final model
    (weights, config, tokenizer, answer vocabulary, run config) to ``<output_dir>/final``. A single-process run
    with a ``data.val`` (or a Karpathy val split) then evaluates it; a multi-process run leaves that to
    ``e2evlp evaluate`` (one rank scoring a large val set would outlast the others' collective timeout)."""
    if task not in TASK_MODELS:
        raise ValueError(f"task must be one of {tuple(TASK_MODELS)}, got {task!r}")
    if not config["train"].get("output_dir") or not config["train"].get("max_steps"):
        raise ValueError("train.output_dir and train.max_steps must be set (in the YAML file or as key=value)")
    device = distributed.init_distributed()
    config = {**config, "train": _warmup_within_run(dict(config["train"]))}
    seed = int(config["train"].get("seed", 0))
    init = config["model"].get("init")
    tokenizer = tokenizer_for(config, resolve_checkpoint(init) if init else None)
    answers, fields = None, {}
    if task == "vqa":
        answers = _answers_for(config)
        fields["num_answers"] = len(answers)
    # The same seed on every rank before the weights are drawn: FSDP2 does not broadcast them as DDP does.
    compiled = config["train"].get("compile", "none") != "none"
    if compiled:
        fields["unpad_encoder"] = _padded_layout(config)
    torch.manual_seed(seed)
    model = build_model(task, config, tokenizer, **fields)
    dataset = build_dataset(task, config, "train", train=True, answers=answers, seed=seed)
    check_detection_labels(dataset, model.config)
    collator = build_collator(task, model.config, tokenizer, train=True, seed=seed, static_shapes=compiled)
    loader = train_loader(dataset, collator, config, seed=seed, num_replicas=distributed.world_size(),
                          rank=distributed.rank(), pin_memory=device.type == "cuda")
    # Fine-tuning models leave parts of the pre-trained trunk unused (VQA and NLVR2: the decoder).
    trainer_config = TrainerConfig(**{"find_unused_parameters": task != "pretrain", **config["train"]})
    trainer = Trainer(model, trainer_config, loader, device=device)
    summary = trainer.train()
    if init:  # the heads a fine-tuning task adds to the trunk it loads start from scratch
        summary["new_heads"] = sorted({name.split(".")[0] for name in getattr(model, "new_weights", ())})
    full_state = distributed.full_model_state_dict(trainer.model) if distributed.is_sharded(trainer.model) else None
    if distributed.is_main_process() and summary.get("stopped") == "done":
        final = export(model, tokenizer, config, answers, state_dict=full_state)
        summary["final"] = str(final)
        if _has_val(task, config):
            if distributed.world_size() == 1:
                summary["eval"] = evaluate_task(task, model, config, "val", tokenizer, answers=answers)
                _append_log(Path(config["train"]["output_dir"]), {"eval": summary["eval"]})
            else:
                summary["eval"] = f"skipped under torchrun: run `{evaluate_command(task, final)}`"
    distributed.barrier()
    distributed.shutdown()
    return summary


def _padded_layout(config: dict) -> bool:
    """unpad_encoder for a compiled run: False, the padded layout (packing the real tokens reads their count on
    the host, which breaks the graph); a config that asks for the packed one with train.compile is refused."""
    if config["model"]["config"].get("unpad_encoder"):
        raise ValueError("train.compile needs the padded encoder layout: remove model.config.unpad_encoder=true "
                         "(packing the real tokens reads their count on the host, which breaks the compiled graph)")
    return False


def _warmup_within_run(train: dict) -> dict:
    """A trial run shorter than the config's warmup (``train.max_steps=60`` with ``warmup_steps: 100``) warms up
    over all its steps instead of failing; the warning names both values. Returns `train`, changed in place."""
    max_steps, warmup = train.get("max_steps"), train.get("warmup_steps", 0)
    numbers = all(isinstance(v, int) and not isinstance(v, bool) for v in (max_steps, warmup))
    if numbers and max_steps >= 1 and warmup > max_steps:
        if distributed.is_main_process():
            warnings.warn(f"train.warmup_steps={warmup} is more than train.max_steps={max_steps}: warming up over "
                          f"all {max_steps} steps (warmup_steps={max_steps}); set train.warmup_steps to choose",
                          stacklevel=3)
        train["warmup_steps"] = max_steps
    return train


def evaluate_command(task: str, final: str | Path) -> str:
    """The command that scores an exported model: its saved run config (``run_config.yaml``) is the default
    ``--config``, so the checkpoint is enough."""
    return f"e2evlp evaluate {task} --checkpoint {shlex.quote(str(final))}"


def saved_run_config(checkpoint: str | Path) -> Path:
    """The run config exported beside a model (``<run>/final/run_config.yaml``): `evaluate`'s default --config."""
    directory = resolve_checkpoint(checkpoint)
    path = directory / "run_config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no run_config.yaml (only a run's final/ export does): pass "
                                f"--config with the run config to evaluate it with")
    return path


def _answers_for(config: dict) -> list[str]:
    init = config["model"].get("init")
    if init:
        directory = resolve_checkpoint(init)
        if (directory / "answer_vocab.json").is_file():
            answers = load_answer_vocab(directory)
            wanted = config["data"].get("answers")
            if wanted is not None and int(wanted) != len(answers):
                raise ValueError(f"data.answers={wanted} but {directory} was trained on {len(answers)} answers; "
                                 "drop data.answers to keep its answer list")
            return answers
    return answer_vocab(config, num_answers=int(config["data"].get("answers", 3129)))


def check_data(task: str, config: dict, split: str = "train", workers: int | None = None) -> dict:
    """Decodes every image file `task`'s `split` reads, in parallel: {"task", "split", "images", "bad": [{"file",
    "error"}]}. The data set is read as training reads it, so a bad annotation file fails here too."""
    answers = _answers_for(config) if task == "vqa" else None
    dataset = build_dataset(task, config, split, train=False, answers=answers)
    files = image_files(dataset.records)
    bad = bad_images(files, workers=workers, progress=config["train"].get("progress", True))
    return {"task": task, "split": split, "images": len(files),
            "bad": [{"file": str(path), "error": error} for path, error in bad]}


def _has_val(task: str, config: dict) -> bool:
    data = config["data"]
    return bool(data.get("val")) or (task in ("caption", "retrieval") and bool(data.get("karpathy")))


def export(model, tokenizer, config: dict, answers: list[str] | None, state_dict: dict | None = None) -> Path:
    """Writes everything `evaluate` and `caption` need into ``<output_dir>/final``."""
    final = Path(config["train"]["output_dir"]) / FINAL_DIR
    model.save_pretrained(final, state_dict=state_dict)
    tokenizer.save_pretrained(str(final))
    if answers is not None:
        save_answer_vocab(final, answers)
    atomic_write(final / "run_config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(config)))
    return final


def _append_log(output_dir: Path, record: dict) -> None:
    with open(output_dir / "log.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")


def evaluate(task: str, config: dict, checkpoint: str | Path, split: str = "val") -> dict:
    """`task`'s metrics of a saved model (a model directory or a run directory's latest checkpoint)."""
    directory = resolve_checkpoint(checkpoint)
    tokenizer = tokenizer_for(config, directory)
    model_task = "pretrain" if task == "detection" else task
    config = {**config, "model": {**config["model"], "init": str(directory)}}
    answers = load_answer_vocab(directory) if task == "vqa" else None
    model = build_model(model_task, config, tokenizer).to(default_device())
    _check_complete(model, directory, model_task)
    return evaluate_task(task, model, config, split, tokenizer, answers=answers)


def _check_complete(model, directory: Path, task: str) -> None:
    """A checkpoint of another task leaves this task's head at random: refuse rather than score noise."""
    if getattr(model, "new_weights", None):
        raise ValueError(f"{directory} has no trained {task} head (missing {model.new_weights[:4]}): pass a "
                         f"checkpoint of a {task} run")


def _device(name: str | torch.device | None) -> torch.device:
    """`name` as a torch.device (None: the default one); a bad or missing device is a ValueError."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...): {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible here (use --device cpu)")
    return device


def caption_images(images: list[str | Path], checkpoint: str | Path, *, tokenizer_dir: str | Path | None = None,
                   num_beams: int = 3, image_size: int | None = None, batch_size: int = 16,
                   max_length: int | None = None, device: str | torch.device | None = None) -> list[str]:
    """Captions for image files, from a pre-training or captioning checkpoint, on `device` (default: the GPU
    when one is visible); `max_length` caps the generated tokens ([SEP] included; default: the model's
    max_caption_length - 1)."""
    if max_length is not None and max_length < 1:
        raise ValueError(f"--max-length must be >= 1, got {max_length}")
    if num_beams < 1:
        raise ValueError(f"--num-beams must be >= 1, got {num_beams}")
    device = _device(device)
    directory = resolve_checkpoint(checkpoint)
    tokenizer = tokenizer_for({"tokenizer": tokenizer_dir}, directory)
    config = json.loads((directory / "config.json").read_text())
    task = "pretrain" if any(name.startswith("mlm_head.") for name in _weight_names(directory)) else "caption"
    model = TASK_MODELS[task].from_pretrained(directory).to(device).eval()
    _check_complete(model, directory, task)
    # The evaluation size of the run that made the checkpoint, else the preset's (DETR's 800 / 1333).
    saved_run = directory / "run_config.yaml"
    if saved_run.is_file():
        image = dict(validate(read_yaml(saved_run.read_text()))["data"]["image"])
    else:
        image = dict(TINY_IMAGES if config.get("backbone") == "tiny" else DETR_IMAGES)
    if image_size is not None:
        image["eval"] = image_size
    transforms = image_transforms({"data": {"image": image}}, train=False)
    captions = []
    for start in range(0, len(images), batch_size):
        pixels = [transforms({"image": load_image(path), "boxes": torch.zeros(0, 4)})["image"]
                  for path in images[start:start + batch_size]]
        padded = pad_images(pixels, size_divisibility=model.config.backbone_stride)
        pixel_values, pixel_mask = (t.to(device) for t in padded)
        with torch.no_grad():
            ids = captioner_of(model).generate(pixel_values, pixel_mask, num_beams=num_beams, max_length=max_length)
        captions += [tokenizer.decode(row, skip_special_tokens=True) for row in ids.tolist()]
    return captions


def _weight_names(directory: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as weights:
        return set(weights.keys())
