"""Datasets over the reader records, seeded per-item randomness, the seeded pre-training batch, task collators."""

import dataclasses

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from e2evlp.data.collate import PretrainingCollator, SizeBucketBatchSampler
from e2evlp.data.datasets import (
    CaptionDataset,
    NLVR2Dataset,
    PretrainingDataset,
    VQADataset,
    split_flip,
)
from e2evlp.data.readers import (
    CocoCaptionsReader,
    CocoInstancesReader,
    KarpathyReader,
    NLVR2Reader,
    NLVR2Record,
    VQAReader,
    build_answer_vocab,
    coco_image_paths,
)
from e2evlp.data.synthetic import write_synthetic_dataset
from e2evlp.data.task_collate import CaptionCollator, NLVR2Collator, VQACollator
from e2evlp.data.transforms import (
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
)
from tests.data_helpers import (
    METADATA_KEYS,
    ImageTextCollator,
    caption_records_from_karpathy,
    split_metadata,
    tiny_eval_transforms,
    tiny_train_transforms,
)

SIZE = (64, 64)


def _nlvr2_records(paths):
    return NLVR2Reader(paths["nlvr2_images"]).read(paths["nlvr2"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from e2evlp.models.text import load_tokenizer

    root = tmp_path_factory.mktemp("synthetic")
    summary = write_synthetic_dataset(root, num_train=8, num_val=4, image_size=SIZE)
    paths = summary["paths"]["train"]
    image_paths = coco_image_paths(paths["captions"], paths["images"])
    vocab = build_answer_vocab([paths["vqa_annotations"]], min_count=1)
    return {
        "captions": CocoCaptionsReader(paths["images"]).read(paths["captions"]),
        "detections": CocoInstancesReader(paths["images"]).read(paths["instances"]),
        "vqa": VQAReader(image_paths, vocab).read(paths["vqa_questions"], paths["vqa_annotations"]),
        "vocab": vocab,
        "nlvr2": _nlvr2_records(paths),
        "karpathy": KarpathyReader(root).read(summary["paths"]["karpathy"], "train"),
        "tokenizer": load_tokenizer(summary["paths"]["tokenizer"]),
    }


def _same(a, b) -> bool:
    """Deep equality of items and batches: tensors by value (and shape), everything else by ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_pretraining_items_join_boxes_to_their_image(data):
    detections = data["detections"]
    without_first = [d for d in detections if d.image_id != detections[0].image_id]
    dataset = PretrainingDataset(data["captions"], without_first, tiny_eval_transforms(), seed=0)
    assert len(dataset) == sum(len(r.captions) for r in data["captions"]) == len(dataset.sizes())
    assert dataset.sizes() == [SIZE] * len(dataset)
    by_id = {d.image_id: d for d in without_first}
    for index in range(len(dataset)):
        item = dataset[index]
        assert set(item) == {"image", "text", "boxes", "labels", "attributes", "image_id", "seed"}
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 80, 80)
        assert item["seed"] == dataset.item_seed(index) and isinstance(item["seed"], int)
        assert item["labels"].dtype == item["attributes"].dtype == torch.long
        record = dataset.records[dataset.pairs[index][0]]
        assert item["image_id"] == record.image_id and item["text"] in record.captions
        if record.image_id == detections[0].image_id:  # no detection annotations: empty targets
            assert item["boxes"].shape == (0, 4) and item["labels"].shape == item["attributes"].shape == (0,)
        else:
            expected = by_id[record.image_id]
            torch.testing.assert_close(item["boxes"], torch.tensor(expected.boxes))  # resizing keeps normalized boxes
            assert item["labels"].tolist() == expected.labels and item["attributes"].tolist() == expected.attributes
    assert PretrainingDataset(data["captions"])[0]["boxes"].shape == (0, 4)  # no detections at all


def test_same_seed_epoch_index_gives_the_same_item(data):
    def items(epoch, seed=7):
        dataset = PretrainingDataset(data["captions"], data["detections"], tiny_train_transforms(), seed=seed)
        dataset.set_epoch(epoch)
        return [dataset[i] for i in range(len(dataset))]

    first = items(0)
    assert _same(first, items(0))  # a fresh object, another draw order
    dataset = PretrainingDataset(data["captions"], data["detections"], tiny_train_transforms(), seed=7)
    assert _same(dataset[5], first[5]) and _same(dataset[5], first[5])  # no state carried between calls
    for other in (items(1), items(0, seed=8)):
        assert not _same(other, first)


def test_seeded_pretraining_batch_is_a_function_of_its_items(data):
    dataset = PretrainingDataset(data["captions"], data["detections"], tiny_train_transforms(), seed=3)
    samples = [dataset[i] for i in (0, 4, 9, 13)]
    collator = PretrainingCollator(data["tokenizer"], max_text_length=24, max_caption_length=24)
    batch = collator(samples)
    assert _same(batch, collator(samples))  # the worker-seeded generator would have moved on
    assert _same(batch, PretrainingCollator(data["tokenizer"], max_text_length=24, max_caption_length=24)(samples))
    reordered = collator(samples[::-1])
    draws = ("itm_labels", "mlm_labels", "input_ids")
    assert not all(_same(reordered[key].flip(0), batch[key]) for key in draws)
    with pytest.raises(ValueError, match="seed"):
        collator([samples[0], {k: v for k, v in samples[1].items() if k != "seed"}])


def test_loader_batches_survive_worker_count_and_resume(data):
    dataset = PretrainingDataset(data["captions"], data["detections"], tiny_train_transforms(), seed=11)
    sampler = SizeBucketBatchSampler(dataset.sizes(), 4, seed=11)
    collator = PretrainingCollator(data["tokenizer"], max_text_length=24, max_caption_length=24)

    def epoch(num_workers, start_batch=0):
        dataset.set_epoch(2)
        sampler.set_epoch(2, start_batch=start_batch)
        return list(DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers))

    batches = epoch(0)
    assert len(batches) == len(sampler) == 6
    assert _same(epoch(2), batches)
    assert _same(epoch(2, start_batch=4), batches[4:])


def test_vqa_items_carry_soft_targets(data):
    dataset = VQADataset(data["vqa"], len(data["vocab"]), tiny_eval_transforms(), seed=0)
    item = dataset[0]
    record = data["vqa"][0]
    assert item["text"] == record.question and item["image"].shape == (3, 80, 80)
    assert item["target"].shape == (len(data["vocab"]),) and item["boxes"].shape == (0, 4)
    assert {i: s for i, s in enumerate(item["target"].tolist()) if s} == pytest.approx(record.target)
    assert item["question_id"] == record.question_id and item["answers"] == record.answers
    assert dataset.sizes() == [SIZE] * len(data["vqa"])
    unanswered = dataclasses.replace(record, answers=None, target=None)
    assert VQADataset([unanswered], 3)[0]["target"].eq(0).all()
    with pytest.raises(ValueError, match="num_answers"):
        VQADataset(data["vqa"], 2)
    with pytest.raises(ValueError, match="num_answers"):
        VQADataset(data["vqa"], 0)


@pytest.fixture()
def nlvr2_pair(tmp_path):
    """A statement about a pair whose images differ in size and content, so a swap is visible."""
    left, right = tmp_path / "pair-img0.png", tmp_path / "pair-img1.png"
    Image.new("RGB", (60, 40), (255, 0, 0)).save(left)
    image = Image.new("RGB", (50, 50), (0, 0, 255))
    image.paste((0, 255, 0), (0, 0, 10, 50))  # a green stripe on its left edge
    image.save(right)
    return NLVR2Record("dev-1-0-0", "The left image is red and the right image has a stripe on the Left.", left,
                       right, True)


def test_nlvr2_flip_mirrors_the_pair_and_keeps_the_label(nlvr2_pair):
    resize = RandomResize([32, 48, 64], 96)
    flipped = NLVR2Dataset([nlvr2_pair], Compose([RandomHorizontalFlip(p=1.0), resize, Normalize()]), seed=4)[0]
    plain = NLVR2Dataset([nlvr2_pair], Compose([RandomHorizontalFlip(p=0.0), resize, Normalize()]), seed=4)[0]
    assert plain["text"] == nlvr2_pair.sentence and plain["label"] == flipped["label"] == 1
    assert flipped["text"] == "The right image is red and the left image has a stripe on the Right."
    assert torch.equal(flipped["images"][0], plain["images"][1].flip(-1))
    assert torch.equal(flipped["images"][1], plain["images"][0].flip(-1))
    assert flipped["images"][0][1, :, -1].mean() > flipped["images"][0][1, :, 0].mean()  # the stripe moved right
    dataset = NLVR2Dataset([nlvr2_pair], Compose([resize, Normalize()]))
    shorter = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        left, right = dataset[0]["images"]
        assert min(left.shape[1:]) == min(right.shape[1:])  # one resize choice for both images
        shorter.add(min(left.shape[1:]))
    assert len(shorter) > 1 and dataset.sizes() == [(50, 60)]
    unlabeled = NLVR2Dataset([dataclasses.replace(nlvr2_pair, label=None)])[0]
    assert unlabeled["label"] == -1 and unlabeled["images"][0].shape == (3, 40, 60)
    assert split_flip(tiny_train_transforms())[0] == 0.5
    with pytest.raises(ValueError, match="RandomHorizontalFlip"):
        split_flip(Compose([RandomHorizontalFlip(), Compose([RandomHorizontalFlip()])]))


def test_caption_dataset_per_caption_and_per_image(data):
    records = data["karpathy"]
    per_caption = CaptionDataset(records, tiny_eval_transforms())
    assert len(per_caption) == sum(len(r.captions) for r in records)
    assert per_caption.sizes() == [SIZE] * len(per_caption)  # read from the image headers
    texts = [per_caption[i]["text"] for i in range(len(per_caption))]
    assert texts == [c for r in records for c in r.captions]
    per_image = CaptionDataset(records, tiny_eval_transforms(), per_caption=False)
    item = per_image[1]
    assert len(per_image) == len(records) and item["references"] == records[1].captions
    assert item["text"] == records[1].captions[0] and item["image_id"] == records[1].image_id
    converted = caption_records_from_karpathy(records)
    assert [(r.height, r.width) for r in converted] == [SIZE] * len(records)
    assert PretrainingDataset(converted)[0]["text"] == records[0].captions[0]


def test_bad_arguments_are_named(data):
    with pytest.raises(ValueError, match="appears in more than one record"):
        PretrainingDataset(data["captions"], data["detections"] * 2)
    with pytest.raises(ValueError, match="captions"):
        PretrainingDataset([dataclasses.replace(data["captions"][0], captions=[])])
    dataset = PretrainingDataset(data["captions"], seed=0)
    with pytest.raises(IndexError, match="index"):
        dataset[len(dataset)]
    with pytest.raises(ValueError, match="epoch"):
        dataset.set_epoch(-1)
    with pytest.raises(ValueError, match="seed"):
        CaptionDataset(data["karpathy"], seed="0")
    with pytest.raises(TypeError, match="Normalize"):
        CaptionDataset(data["karpathy"], transforms=Compose([]))[0]
    with pytest.raises(ValueError, match="max_text_length"):
        VQACollator(data["tokenizer"], max_text_length=2)


def _config(data):
    from e2evlp.models.config import E2EVLPConfig

    return E2EVLPConfig.tiny(vocab_size=len(data["tokenizer"]), pad_token_id=0, cls_token_id=2, sep_token_id=3,
                             mask_token_id=4, num_answers=len(data["vocab"]))


def _run(model_class, config, batch):
    inputs, metadata = split_metadata(batch)
    assert set(metadata) <= set(METADATA_KEYS) and not set(inputs) & set(METADATA_KEYS)
    torch.manual_seed(0)
    return model_class(config)(**inputs)


def test_vqa_and_nlvr2_batches_run_through_their_models(data, monkeypatch):
    from e2evlp.models.tasks import E2EVLPForNLVR2, E2EVLPForVQA

    monkeypatch.setenv("E2EVLP_ATTENTION", "sdpa")
    tokenizer, config = data["tokenizer"], _config(data)
    vqa = VQADataset(data["vqa"], len(data["vocab"]), tiny_train_transforms())
    batch = VQACollator(tokenizer)([vqa[i] for i in range(3)])
    assert batch["labels"].shape == (3, len(data["vocab"])) and batch["pixel_mask"].dtype == torch.bool
    assert batch["question_ids"] == [r.question_id for r in data["vqa"][:3]]
    assert torch.isfinite(_run(E2EVLPForVQA, config, batch).loss)

    nlvr2 = NLVR2Dataset(data["nlvr2"], tiny_train_transforms())
    samples = [nlvr2[i] for i in range(len(nlvr2))]
    batch = NLVR2Collator(tokenizer)(samples)
    B, H, W = len(samples), *batch["pixel_values"].shape[-2:]
    assert batch["pixel_values"].shape == (B, 2, 3, H, W) and batch["pixel_mask"].shape == (B, 2, H, W)
    assert batch["labels"].tolist() == [int(r.label) for r in data["nlvr2"]]
    assert batch["identifiers"] == [r.identifier for r in data["nlvr2"]]
    assert torch.isfinite(_run(E2EVLPForNLVR2, config, batch).loss)
    unlabeled = [{**sample, "label": -1} for sample in samples]
    assert "labels" not in NLVR2Collator(tokenizer)(unlabeled)
    with pytest.raises(ValueError, match="unlabeled"):
        NLVR2Collator(tokenizer)(unlabeled[:1] + samples[1:])


def test_caption_and_image_text_batches_run_through_their_models(data, monkeypatch):
    from e2evlp.models.captioning import E2EVLPForCaptioning
    from e2evlp.models.tasks import E2EVLPForRetrieval

    monkeypatch.setenv("E2EVLP_ATTENTION", "sdpa")
    tokenizer, config = data["tokenizer"], _config(data)
    dataset = CaptionDataset(data["karpathy"], tiny_train_transforms(), per_caption=False)
    samples = [dataset[i] for i in range(3)]
    batch = CaptionCollator(tokenizer, max_caption_length=config.max_caption_length)(samples)
    assert batch["caption_ids"].shape == batch["caption_mask"].shape and batch["caption_ids"].shape[1] <= 24
    assert (batch["caption_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert batch["references"] == [s["references"] for s in samples]
    assert torch.isfinite(_run(E2EVLPForCaptioning, config, batch).loss)

    batch = ImageTextCollator(tokenizer)(samples)
    assert batch["image_ids"] == [r.image_id for r in data["karpathy"][:3]]
    assert torch.isfinite(_run(E2EVLPForRetrieval, config, batch).logits).all()
    with pytest.raises(ValueError, match="samples"):
        ImageTextCollator(tokenizer)([])


def test_static_shapes_batches_have_fixed_shapes_and_padded_targets(data):
    from e2evlp.data.collate import IMAGE_BUCKET
    from e2evlp.nn import PaddedTargets

    dataset = PretrainingDataset(data["captions"], data["detections"], tiny_train_transforms(), seed=3)
    collator = PretrainingCollator(data["tokenizer"], max_text_length=24, max_caption_length=20, static_shapes=True)
    lists = PretrainingCollator(data["tokenizer"], max_text_length=24, max_caption_length=20)
    for indices in ((0, 4), (9, 13, 2)):
        samples = [dataset[i] for i in indices]
        batch = collator(samples)
        assert batch["input_ids"].shape[1] == 24 and batch["caption_ids"].shape[1] == 20
        assert all(side % IMAGE_BUCKET == 0 for side in batch["pixel_values"].shape[-2:])
        targets = batch["targets"]
        assert isinstance(targets, PaddedTargets) and targets.labels.shape[1] in (8, 16, 32)
        for padded, listed in zip(targets.to_list(), lists(samples)["targets"]):
            for key in ("labels", "boxes", "attributes"):
                torch.testing.assert_close(padded[key], listed[key])
    bad = [dataset[0], dataset[4]]
    bad[0] = dict(bad[0], boxes=torch.tensor([[0.5, 0.5, -0.1, 0.2]]), labels=torch.tensor([1]),
                  attributes=torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        collator(bad)
