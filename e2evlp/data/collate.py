"""Batching for pre-training: image padding, BERT token masking, the ITM/MLM/caption collator, a size-bucket sampler."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, get_worker_info

from e2evlp.nn.targets import PaddedTargets, pad_targets, validate_targets

from .transforms import mix_seeds


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pad_images(images: Sequence[Tensor], *, size_divisibility: int = 1) -> tuple[Tensor, Tensor]:
    """Zero-pads [3, H_i, W_i] images at the bottom/right into pixel_values [B, 3, Hmax, Wmax] and
    pixel_mask [B, Hmax, Wmax] (True on real pixels); Hmax, Wmax are rounded up to ``size_divisibility``."""
    if not images:
        raise ValueError("pad_images needs at least one image")
    height = _round_up(max(image.shape[-2] for image in images), size_divisibility)
    width = _round_up(max(image.shape[-1] for image in images), size_divisibility)
    first = images[0]
    pixel_values = first.new_zeros(len(images), first.shape[0], height, width)  # [B, 3, Hmax, Wmax]
    pixel_mask = torch.zeros(len(images), height, width, dtype=torch.bool, device=first.device)  # [B, Hmax, Wmax]
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        pixel_values[i, :, :h, :w] = image
        pixel_mask[i, :h, :w] = True
    return pixel_values, pixel_mask


def tokenize(tokenizer, texts: list[str], max_length: int, *, pad_to_max: bool = False) -> tuple[Tensor, Tensor]:
    """input_ids [B, L] and attention_mask [B, L], truncated to ``max_length`` and padded to the longest text
    (to ``max_length`` with `pad_to_max`, so that every batch has one shape)."""
    encoded = tokenizer(texts, padding="max_length" if pad_to_max else "longest", truncation=True,
                        max_length=max_length, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def batch_generator(samples: Sequence[dict], seed: int = 0) -> torch.Generator | None:
    """A generator seeded by ``seed`` and the samples' "seed" keys in order, so a batch's random draws are a pure
    function of its items (identical on resume, whatever the worker count); None when no sample has a seed.
    Raises ValueError when only some samples carry one: such a batch could be neither seeded nor reproduced."""
    seeded = ["seed" in sample for sample in samples]
    if not any(seeded):
        return None
    if not all(seeded):
        raise ValueError(f"samples: {seeded.count(False)} of {len(samples)} have no 'seed' key; either every "
                         "sample carries one (seeded datasets) or none does")
    return torch.Generator().manual_seed(mix_seeds(seed, *(int(sample["seed"]) for sample in samples)))


def _force_one_choice(chosen: Tensor, eligible: Tensor, generator: torch.Generator | None) -> Tensor:
    """Adds one random eligible token to every row that has eligible tokens but none chosen."""
    empty = eligible.any(1) & ~chosen.any(1)  # [B]
    scores = torch.rand(eligible.shape, generator=generator).masked_fill(~eligible, -1.0)  # [B, L]
    pick = torch.zeros_like(chosen)
    pick[torch.arange(len(pick)), scores.argmax(1)] = True
    return chosen | (pick & empty[:, None])


def mask_tokens(input_ids: Tensor, attention_mask: Tensor, *, vocab_size: int, mask_token_id: int = 103,
                special_ids: Sequence[int] = (0, 101, 102), probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT masking: each real, non-special token is chosen with ``probability``; a chosen token becomes
    [MASK] 80%, a random token 10%, stays itself 10%. Returns (masked_ids [B, L], mlm_labels [B, L]: the
    original id on chosen tokens, -100 elsewhere).

    With ``probability`` > 0, every row that has a real non-special token gets at least one chosen token, so
    short captions never contribute an empty MLM target (the effective rate is then slightly above
    ``probability`` on them); ``probability`` = 0 masks nothing.
    """
    eligible = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(list(special_ids)))  # [B, L]
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & eligible
    if probability > 0:
        chosen = _force_one_choice(chosen, eligible, generator)
    labels = input_ids.masked_fill(~chosen, -100)
    action = torch.rand(input_ids.shape, generator=generator)  # [B, L]: < .8 mask, < .9 random, else keep
    masked = input_ids.masked_fill(chosen & (action < 0.8), mask_token_id)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    replace = chosen & (action >= 0.8) & (action < 0.9)
    return torch.where(replace, random_ids, masked), labels


def _negative_partners(texts: Sequence[str], image_ids: Sequence, fraction: float,
                       generator: torch.Generator) -> list[int]:
    """For each item, the index whose text it gets: itself (matched) or, for ``fraction`` of the items,
    another item of a different image with a different text. An item whose every other item shows the same
    image (or carries the same text) stays matched, so such a batch has fewer negatives than ``fraction``."""
    partners = list(range(len(texts)))
    if len(texts) < 2:
        return partners
    for i in torch.randperm(len(texts), generator=generator)[: round(fraction * len(texts))].tolist():
        # Another caption of the same image (5 per COCO image, dozens of VG region phrases) or a duplicate
        # caption string would be a false "no match".
        others = [j for j, (text, image) in enumerate(zip(texts, image_ids))
                  if image != image_ids[i] and text != texts[i]]
        if others:
            partners[i] = others[int(torch.randint(len(others), (), generator=generator))]
    return partners


IMAGE_BUCKET = 128  # pixels: with static_shapes, image sides are rounded up to a multiple of it


def padded_for_compile(targets: list[dict]) -> PaddedTargets:
    """`targets` as PaddedTargets with a bucketed slot count, their boxes checked on the host."""
    padded = pad_targets(targets, "cpu", bucket=True)
    validate_targets(padded)
    return padded


class PretrainingCollator:
    """Turns transformed samples {"image" [3, H, W], "text", "image_id", "boxes" [T, 4] cxcywh, "labels" [T],
    "attributes" [T]} into the keyword arguments of E2EVLPForPretraining.forward.

    When the samples carry a "seed" (the datasets of e2evlp.data.datasets set one), ITM partners and MLM masks
    are drawn from a generator seeded by the collator's seed and the samples' seeds in order: the batch is then a
    pure function of its items. Samples without seeds draw from a lazily created, worker-seeded generator.

    ITM negatives pair an image with the text of an item that shows another image (by "image_id": ids that
    collide across sources only make negatives rarer) and carries another text; an item with no such partner
    in the batch stays matched. Every text is masked the same way, but only matched pairs carry MLM labels (as
    in UNITER, MLM is learned on matched pairs only): masking only the matched texts would let the ITM head
    read the answer off the presence of [MASK]. The caption target is always the item's own, unmasked text.

    ``static_shapes=True`` makes batches a compiled step (and CUDA graphs) can replay without recompiling: the
    targets come as ``e2evlp.nn.PaddedTargets`` padded to a bucketed count (8, 16, 32, ...), their boxes checked
    here on the host; texts are padded to their maximum lengths; image sides are rounded up to a multiple of
    ``IMAGE_BUCKET`` pixels (with SizeBucketBatchSampler a few shapes cover a data set). The default pads to the
    batch's longest text and image and gives DETR's list of target dicts.
    """

    def __init__(self, tokenizer, *, max_text_length: int = 40, max_caption_length: int = 40,
                 mlm_probability: float = 0.15, itm_negative_fraction: float = 0.5, seed: int = 0,
                 size_divisibility: int = 32, static_shapes: bool = False):
        self.tokenizer = tokenizer
        self.max_text_length, self.max_caption_length = max_text_length, max_caption_length
        self.mlm_probability, self.itm_negative_fraction = mlm_probability, itm_negative_fraction
        self.seed, self.size_divisibility = seed, size_divisibility
        self.static_shapes = static_shapes
        self._generator: torch.Generator | None = None

    def generator(self) -> torch.Generator:
        """For unseeded samples: created lazily with the DataLoader worker id mixed in, so workers draw
        different negatives/masks."""
        if self._generator is None:
            worker = get_worker_info()
            self._generator = torch.Generator().manual_seed(self.seed + (worker.id if worker else 0))
        return self._generator

    def __call__(self, samples: list[dict]) -> dict:
        generator = batch_generator(samples, self.seed)
        if generator is None:
            generator = self.generator()
        texts = [sample["text"] for sample in samples]
        if not all("image_id" in sample for sample in samples):
            raise ValueError("samples need an 'image_id': ITM negatives must show another image than their text's")
        partners = _negative_partners(texts, [sample["image_id"] for sample in samples], self.itm_negative_fraction,
                                      generator)
        itm_labels = torch.tensor([int(j == i) for i, j in enumerate(partners)])  # [B]
        input_ids, attention_mask = tokenize(self.tokenizer, [texts[j] for j in partners], self.max_text_length,
                                             pad_to_max=self.static_shapes)
        input_ids, mlm_labels = mask_tokens(
            input_ids, attention_mask, vocab_size=len(self.tokenizer), mask_token_id=self.tokenizer.mask_token_id,
            special_ids=self.tokenizer.all_special_ids, probability=self.mlm_probability, generator=generator)
        mlm_labels = mlm_labels.masked_fill(itm_labels[:, None] == 0, -100)
        caption_ids, caption_mask = tokenize(self.tokenizer, texts, self.max_caption_length,
                                             pad_to_max=self.static_shapes)
        divisibility = math.lcm(self.size_divisibility, IMAGE_BUCKET) if self.static_shapes else self.size_divisibility
        pixel_values, pixel_mask = pad_images([sample["image"] for sample in samples], size_divisibility=divisibility)
        batch = dict(pixel_values=pixel_values, pixel_mask=pixel_mask, input_ids=input_ids,
                     attention_mask=attention_mask, mlm_labels=mlm_labels, itm_labels=itm_labels,
                     caption_ids=caption_ids, caption_mask=caption_mask)
        # Image-text pairs without boxes (retrieval fine-tuning on captions only) train the other tasks.
        if all("labels" in sample for sample in samples):
            targets = [{"labels": sample["labels"].long(), "boxes": sample["boxes"].float(),
                        "attributes": sample["attributes"].long()} for sample in samples]
            batch["targets"] = padded_for_compile(targets) if self.static_shapes else targets
        return batch


class SizeBucketBatchSampler(BatchSampler):
    """Batches of similarly shaped images, so padding wastes less compute.

    Each epoch: shuffle the indices, cut them into chunks of ``batch_size * bucket_size_multiplier``, sort
    each chunk by orientation then area, cut it into batches, and shuffle the batch order. Every index
    appears exactly once (the last, short batch is dropped with ``drop_last``).

    Distributed training: every rank builds the same epoch list, cuts it to a multiple of ``num_replicas``
    batches and takes batches ``rank, rank + num_replicas, ...``, so all ranks run the same number of steps.
    ``set_epoch(epoch, start_batch)`` resumes mid-epoch: passes over that epoch skip this rank's first
    ``start_batch`` batches until the next ``set_epoch`` (it sticks because DataLoader calls ``iter`` on its
    batch sampler more than once per pass).
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 bucket_size_multiplier: int = 50, drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(len(sizes)), batch_size, drop_last)
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an int in [0, num_replicas={num_replicas}), got {rank!r}")
        self.sizes, self.shuffle, self.seed = list(sizes), shuffle, seed
        self.chunk = batch_size * bucket_size_multiplier
        self.num_replicas, self.rank = num_replicas, rank
        if num_replicas > 1 and self._epoch_batches() < num_replicas:
            raise ValueError(f"num_replicas ({num_replicas}) exceeds the {self._epoch_batches()} batches of an "
                             f"epoch ({len(self.sizes)} items, batch_size {batch_size}): some ranks would get none")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Reseeds the next epoch's order (call it before each epoch, as with DistributedSampler); passes skip
        this rank's first ``start_batch`` batches of that epoch (to resume after a checkpoint)."""
        if isinstance(start_batch, bool) or not isinstance(start_batch, int) or not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be an int in [0, {len(self)}] (batches per rank), got {start_batch!r}")
        self.epoch, self.start_batch = epoch, start_batch

    def _sort_key(self, index: int) -> tuple[bool, int]:
        height, width = self.sizes[index]
        return height > width, height * width

    def _batches(self, generator: torch.Generator) -> list[list[int]]:
        order = torch.randperm(len(self.sizes), generator=generator).tolist() if self.shuffle \
            else list(range(len(self.sizes)))
        batches = []
        for start in range(0, len(order), self.chunk):
            chunk = sorted(order[start:start + self.chunk], key=self._sort_key)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # Chunks are whole multiples of batch_size, so only the very last batch can be short.
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def _epoch_batches(self) -> int:
        """Batches in one epoch over all ranks, before the cut to a multiple of num_replicas."""
        if self.drop_last:
            return len(self.sizes) // self.batch_size
        return math.ceil(len(self.sizes) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = self._batches(generator)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        mine = batches[self.rank:len(self) * self.num_replicas:self.num_replicas]
        return iter(mine[self.start_batch:])

    def __len__(self) -> int:
        """This rank's batches in a whole epoch (a resumed pass yields ``start_batch`` fewer)."""
        return self._epoch_batches() // self.num_replicas
