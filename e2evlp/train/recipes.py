"""Task recipes: from a run config, build each task's model, data sets, loaders and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from e2evlp.data.collate import PretrainingCollator, SizeBucketBatchSampler
from e2evlp.data.datasets import CaptionDataset, NLVR2Dataset, PretrainingDataset, VQADataset
from e2evlp.data.readers import (
    CocoCaptionsReader,
    CocoInstancesReader,
    KarpathyReader,
    NLVR2Reader,
    VisualGenomeReader,
    VisualGenomeRegionsReader,
    VQAReader,
    build_answer_vocab,
    coco_image_paths,
    read_vocab,
)
from e2evlp.data.task_collate import CaptionCollator, NLVR2Collator, VQACollator
from e2evlp.data.transforms import eval_transforms, train_transforms
from e2evlp.eval.evaluate import (
    caption_scores,
    evaluate_nlvr2,
    evaluate_pretraining,
    evaluate_retrieval,
    evaluate_vqa,
    generate_captions,
)
from e2evlp.models import (
    E2EVLPConfig,
    E2EVLPForCaptioning,
    E2EVLPForNLVR2,
    E2EVLPForPretraining,
    E2EVLPForRetrieval,
    E2EVLPForVQA,
)
from e2evlp.models.pretrained import WEIGHTS_NAME
from e2evlp.models.text import load_tokenizer
from e2evlp.train.checkpoint import latest_checkpoint

TASK_MODELS = {"pretrain": E2EVLPForPretraining, "vqa": E2EVLPForVQA, "nlvr2": E2EVLPForNLVR2,
               "caption": E2EVLPForCaptioning, "retrieval": E2EVLPForRetrieval}
EVAL_TASKS = (*TASK_MODELS, "detection")
ANSWER_VOCAB_NAME = "answer_vocab.json"


def resolve_checkpoint(path: str | Path) -> Path:
    """A model directory (holding model.safetensors); for a run directory its exported ``final/`` (which also
    holds the tokenizer and the VQA answers), else its latest complete ``step-*`` checkpoint."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():
        return path
    if (path / "final" / WEIGHTS_NAME).is_file():
        return path / "final"
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor a complete step-* checkpoint")
    return latest


def tokenizer_for(config: dict, checkpoint: Path | None = None):
    """The run's tokenizer: ``tokenizer`` in the config, else the one saved beside the checkpoint."""
    if config.get("tokenizer"):
        return load_tokenizer(config["tokenizer"])
    for directory in [checkpoint, checkpoint.parent if checkpoint else None]:
        if directory is not None and (directory / "tokenizer.json").is_file():
            return load_tokenizer(directory)
    raise ValueError(f"no tokenizer saved with {checkpoint}: set `tokenizer` in the run config (or --tokenizer) to a "
                     "local directory with vocab.txt (e.g. bert-base-uncased)")


def build_model(task: str, config: dict, tokenizer, **config_fields) -> nn.Module:
    """`task`'s model: from ``model.init`` (a checkpoint, any task's) or fresh from ``model.preset``, with
    ``model.config`` and `config_fields` applied; ``model.bert`` initialises a fresh encoder from BERT."""
    section = config["model"]
    fields = {**section["config"], **config_fields}
    model_class = TASK_MODELS[task]
    if section.get("init"):
        return model_class.from_pretrained(resolve_checkpoint(section["init"]), **fields)
    special = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                   cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                   mask_token_id=tokenizer.mask_token_id)
    model = model_class(getattr(E2EVLPConfig, section["preset"])(**{**special, **fields}))
    if section.get("bert"):
        model.model.load_bert(section["bert"])
    return model


def image_transforms(config: dict, train: bool):
    image = config["data"]["image"]
    if train:
        return train_transforms(image["train_min"], image["train_max"], image["max_longer"], image["train_step"])
    return eval_transforms(image["eval"], image["max_longer"])


def _sources(data: dict, split: str) -> list[dict]:
    sources = data.get(split)
    if not sources:
        raise ValueError(f"data.{split} is not set: list its files (see configs/ for the layout)")
    return sources if isinstance(sources, list) else [sources]


def _karpathy_split(data: dict, split: str) -> str:
    return data.get(f"{split}_split", split)


def answer_vocab(config: dict, num_answers: int) -> list[str]:
    """The VQA answer vocabulary: the `num_answers` most frequent answers of the train annotations."""
    files = [source["annotations"] for source in _sources(config["data"], "train")]
    return build_answer_vocab(files, top_k=num_answers)


def pretraining_records(data: dict, split: str) -> tuple[list, list]:
    """(caption records, detection records) of `split`'s sources, each either COCO-format
    {images, captions, instances} or Visual Genome {images, image_data, regions, objects, attributes,
    object_vocab, attribute_vocab}. Detection labels must come from one vocabulary across the sources."""
    skip_bad = bool(data.get("skip_bad", False))
    captions, detections, vocabularies = [], [], {}
    for source in _sources(data, split):
        if "regions" in source or "objects" in source:
            source_captions, source_detections, vocabulary = _visual_genome_records(source, skip_bad)
            where = source.get("object_vocab")
        else:
            source_captions = CocoCaptionsReader(source["images"], skip_bad=skip_bad).read(source["captions"])
            source_detections, vocabulary, where = [], None, source.get("instances")
            if source.get("instances"):
                reader = CocoInstancesReader(source["images"], skip_bad=skip_bad)
                source_detections = reader.read(source["instances"])
                vocabulary = tuple(reader.class_names)
        captions += source_captions
        detections += source_detections
        if vocabulary is not None:
            vocabularies.setdefault(vocabulary, where)
    if len(vocabularies) > 1:
        raise ValueError(f"data.{split} mixes detection vocabularies ({', '.join(map(str, vocabularies.values()))} "
                         f"name different classes): a class index must mean one thing, use one vocabulary")
    return captions, detections


def _visual_genome_records(source: dict, skip_bad: bool) -> tuple[list, list, tuple | None]:
    """Region phrases as captions and, with ``objects``, boxes labelled by ``object_vocab``."""
    for key in ("images", "image_data", "regions"):
        if not source.get(key):
            raise ValueError(f"a Visual Genome source needs '{key}' (it has {sorted(source)})")
    captions = VisualGenomeRegionsReader(source["images"], skip_bad=skip_bad).read(source["regions"],
                                                                                  source["image_data"])
    if not source.get("objects"):
        return captions, [], None
    if not source.get("object_vocab"):
        raise ValueError("a Visual Genome source with 'objects' needs 'object_vocab' (one class per line, "
                         "e.g. bottom-up attention's objects_vocab.txt)")
    attribute_vocab = read_vocab(source["attribute_vocab"]) if source.get("attribute_vocab") else []
    object_vocab = read_vocab(source["object_vocab"])
    reader = VisualGenomeReader(source["images"], object_vocab, attribute_vocab, skip_bad=skip_bad)
    detections = reader.read(source["objects"], source.get("attributes"), source["image_data"])
    return captions, detections, tuple(object_vocab)


def check_detection_labels(dataset, model_config: E2EVLPConfig) -> None:
    """Every box's class and attribute index must exist in the model's heads (else CUDA would assert)."""
    if not isinstance(dataset, PretrainingDataset):
        return
    classes, attributes = dataset.label_bounds()
    if classes > model_config.num_classes or attributes > model_config.num_attributes:
        raise ValueError(f"the detection data uses {classes} classes and {attributes} attributes but the model has "
                         f"num_classes={model_config.num_classes} and num_attributes={model_config.num_attributes}: "
                         f"set model.config.num_classes and num_attributes to the vocabulary sizes")


def build_dataset(task: str, config: dict, split: str, *, train: bool, answers: list[str] | None = None,
                  per_caption: bool = True, seed: int = 0):
    """The data set of `task` for `split` ("train", "val" or "test") from the config's data section;
    ``data.cache_images`` keeps its decoded images in memory (small sets read with num_workers=0)."""
    dataset = _dataset(task, config, split, train=train, answers=answers, per_caption=per_caption, seed=seed)
    if config["data"].get("cache_images"):
        dataset.cache_images()
    return dataset


def _dataset(task: str, config: dict, split: str, *, train: bool, answers: list[str] | None, per_caption: bool,
             seed: int):
    data, skip_bad = config["data"], bool(config["data"].get("skip_bad", False))
    transforms = image_transforms(config, train)
    if task in ("pretrain", "detection"):
        return PretrainingDataset(*pretraining_records(data, split), transforms, seed=seed)
    if task == "vqa":
        records = []
        for source in _sources(data, split):
            paths = coco_image_paths(source["image_index"], source["images"])
            records += VQAReader(paths, answers, skip_bad=skip_bad).read(source["questions"],
                                                                         source.get("annotations"))
        return VQADataset(records, len(answers), transforms, seed=seed)
    if task == "nlvr2":
        records = []
        for source in _sources(data, split):
            records += NLVR2Reader(source["images"], skip_bad=skip_bad).read(source["file"])
        return NLVR2Dataset(records, transforms, seed=seed)
    if task in ("caption", "retrieval"):
        if not data.get("karpathy") or not data.get("images"):
            raise ValueError(f"{task} needs data.karpathy (dataset_coco.json / dataset_flickr30k.json) and data.images")
        records = KarpathyReader(data["images"], skip_bad=skip_bad).read(
            data["karpathy"], _karpathy_split(data, split), merge_restval=bool(data.get("merge_restval", False)))
        return CaptionDataset(records, transforms, seed=seed, per_caption=per_caption)
    raise ValueError(f"task must be one of {EVAL_TASKS}, got {task!r}")


class RenameKeys:
    """Wraps a collator and renames batch keys (ITM pairs for the retrieval model: itm_labels → labels)."""

    def __init__(self, collator, names: dict[str, str]):
        self.collator, self.names = collator, names

    def __call__(self, samples: list[dict]) -> dict:
        return {self.names.get(key, key): value for key, value in self.collator(samples).items()}


def build_collator(task: str, model_config: E2EVLPConfig, tokenizer, *, train: bool, seed: int = 0,
                   static_shapes: bool = False):
    """`task`'s collator; evaluation batches of the pre-training task keep their text unmasked. `static_shapes`
    (compiled training) gives pre-training batches a few fixed shapes and padded targets."""
    text, caption = model_config.max_text_length, model_config.max_caption_length
    stride = model_config.backbone_stride
    if task in ("pretrain", "detection"):
        return PretrainingCollator(tokenizer, max_text_length=text, max_caption_length=caption, seed=seed,
                                   mlm_probability=0.15 if train else 0.0, size_divisibility=stride,
                                   static_shapes=static_shapes)
    if task == "vqa":
        return VQACollator(tokenizer, max_text_length=text, size_divisibility=stride)
    if task == "nlvr2":
        return NLVR2Collator(tokenizer, max_text_length=text, size_divisibility=stride)
    if task == "caption" or (task == "retrieval" and not train):
        return CaptionCollator(tokenizer, max_caption_length=caption, size_divisibility=stride)
    if task == "retrieval":
        return RenameKeys(PretrainingCollator(tokenizer, max_text_length=text, max_caption_length=caption,
                                              seed=seed, mlm_probability=0.0, size_divisibility=stride),
                          {"itm_labels": "labels"})
    raise ValueError(f"task must be one of {EVAL_TASKS}, got {task!r}")


def train_loader(dataset, collator, config: dict, *, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """Shuffled, size-bucketed, sharded across ranks; the trainer sets its epoch and resume position."""
    data = config["data"]
    sampler = SizeBucketBatchSampler(dataset.sizes(), data["batch_size"], shuffle=True, seed=seed, drop_last=True,
                                     num_replicas=num_replicas, rank=rank)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=data["num_workers"],
                      pin_memory=pin_memory)


def eval_loader(dataset, collator, config: dict) -> DataLoader:
    data = config["data"]
    return DataLoader(dataset, batch_size=data.get("eval_batch_size", data["batch_size"]), shuffle=False,
                      collate_fn=collator, num_workers=data["num_workers"])


def captioner_of(model: nn.Module) -> E2EVLPForCaptioning:
    """The captioning view of a pre-training or captioning model (shared weights)."""
    if isinstance(model, E2EVLPForCaptioning):
        return model
    return E2EVLPForCaptioning.sharing(model.model, model.caption_head)


def evaluate_task(task: str, model: nn.Module, config: dict, split: str, tokenizer, *,
                  answers: list[str] | None = None, num_beams: int | None = None) -> dict:
    """`task`'s metrics for `model` on `split`; "pretrain" gives ITM, detection and captioning metrics."""
    model_config = model.config
    beams = num_beams or config["eval"].get("num_beams", 1)
    if task in ("pretrain", "detection"):
        captions, detections = pretraining_records(config["data"], split)
        transforms = image_transforms(config, train=False)
        collator = build_collator(task, model_config, tokenizer, train=False)
        dataset = PretrainingDataset(captions, detections, transforms)
        check_detection_labels(dataset, model_config)
        metrics = evaluate_pretraining(model, eval_loader(dataset, collator, config))
        if task == "detection":
            return {key: value for key, value in metrics.items() if key.startswith("det_")}
        per_image = CaptionDataset(captions, transforms, per_caption=False)
        return {**metrics, **_caption_metrics(model, per_image, config, tokenizer, beams)}
    if task == "vqa":
        dataset = build_dataset(task, config, split, train=False, answers=answers)
        collator = build_collator(task, model_config, tokenizer, train=False)
        result = evaluate_vqa(model, eval_loader(dataset, collator, config), answers)
        return {"vqa_acc": result["vqa_acc"]}
    if task == "nlvr2":
        dataset = build_dataset(task, config, split, train=False)
        return evaluate_nlvr2(model, eval_loader(dataset, build_collator(task, model_config, tokenizer,
                                                                         train=False), config))
    dataset = build_dataset(task, config, split, train=False, per_caption=False)
    if task == "caption":
        return _caption_metrics(model, dataset, config, tokenizer, beams)
    loader = eval_loader(dataset, build_collator("caption", model_config, tokenizer, train=False), config)
    return evaluate_retrieval(model, loader, tokenizer)


def _caption_metrics(model: nn.Module, per_image: CaptionDataset, config: dict, tokenizer, num_beams: int) -> dict:
    collator = build_collator("caption", model.config, tokenizer, train=False)
    hypotheses, references = generate_captions(captioner_of(model), eval_loader(per_image, collator, config),
                                               tokenizer, num_beams=num_beams)
    return {f"caption_{key}": value for key, value in caption_scores(hypotheses, references).items()}


def save_answer_vocab(directory: Path, answers: list[str]) -> None:
    (directory / ANSWER_VOCAB_NAME).write_text(json.dumps(answers) + "\n")


def load_answer_vocab(directory: Path) -> list[str]:
    path = directory / ANSWER_VOCAB_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {ANSWER_VOCAB_NAME} in {directory}: a VQA checkpoint saves its answers there")
    return json.loads(path.read_text())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
