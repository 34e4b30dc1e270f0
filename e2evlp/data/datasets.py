"""Torch datasets over the reader records (pre-training, VQA, NLVR2, captioning) with seeded, resumable transforms."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .readers_base import DataError, load_image
from .readers_coco import CaptionRecord, DetectionRecord, KarpathyRecord
from .readers_nlvr2 import NLVR2Record
from .readers_vqa import VQARecord
from .transforms import Compose, Normalize, RandomHorizontalFlip, apply_transform, mix_seeds, swap_left_right

Transforms = Callable[..., dict]


def image_header_size(path: str | Path) -> tuple[int, int]:
    """(height, width) read from the image file's header, without decoding its pixels."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file not found") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read the image header ({err})") from err


def _empty_boxes() -> Tensor:
    return torch.zeros(0, 4)  # [0, 4]: RandomResize and RandomHorizontalFlip expect boxes on every sample


class SeededDataset(Dataset, ABC):
    """Base of the datasets: a transform generator per item, seeded by mix_seeds(seed, epoch, index).

    Every random draw of an item is a pure function of (seed, epoch, index), so a resumed run reproduces its
    batches whatever the DataLoader worker count. Call ``set_epoch`` before each epoch, as with the sampler;
    persistent DataLoader workers keep the epoch their copy had when they started, so recreate the workers
    (the default, ``persistent_workers=False``) for the new epoch to reach them.

    ``transforms`` is a callable on sample dicts that must leave a [3, H, W] tensor image (end with Normalize);
    None means Normalize only (the file's own size).
    """

    def __init__(self, transforms: Transforms | None, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.transforms = transforms if transforms is not None else Normalize()
        self.seed, self.epoch = seed, 0
        self._sizes: list[tuple[int, int]] | None = None
        self._header_sizes: dict[Path, tuple[int, int]] = {}
        self._image_cache: dict[Path, object] | None = None

    def cache_images(self) -> None:
        """Keeps every decoded image in memory after its first read: for small sets (the demo's) read with
        ``num_workers=0``, where decoding would otherwise repeat every epoch. Transforms never modify the
        cached image in place (they return new ones)."""
        self._image_cache = {}

    def load(self, path: Path):
        if self._image_cache is None:
            return load_image(path)
        if path not in self._image_cache:
            self._image_cache[path] = load_image(path)
        return self._image_cache[path]

    def set_epoch(self, epoch: int) -> None:
        """Draws the next items' randomness for ``epoch``."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def item_seed(self, index: int) -> int:
        """The seed of item ``index`` in the current epoch (also the sample's "seed" key)."""
        return mix_seeds(self.seed, self.epoch, index)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        return index

    def _transformed(self, sample: dict, transforms: Transforms, generator: torch.Generator) -> dict:
        sample = apply_transform(transforms, sample, generator)
        if not isinstance(sample["image"], Tensor):
            raise TypeError(f"transforms must turn the image into a tensor (end with Normalize), got "
                            f"{type(sample['image']).__name__}")
        return sample

    def _finish(self, sample: dict, index: int) -> dict:
        """The transformed sample with its "seed"."""
        seed = self.item_seed(index)
        sample = self._transformed(sample, self.transforms, torch.Generator().manual_seed(seed))
        return {**sample, "seed": seed}

    def _header_size(self, path: Path) -> tuple[int, int]:
        if path not in self._header_sizes:
            self._header_sizes[path] = image_header_size(path)
        return self._header_sizes[path]

    def _record_size(self, record) -> tuple[int, int]:
        """(height, width) from the record's metadata when it has any, else from the image header."""
        if hasattr(record, "width") and hasattr(record, "height"):
            return record.height, record.width
        return self._header_size(Path(record.image_path))

    @abstractmethod
    def _item_size(self, index: int) -> tuple[int, int]:
        """(height, width) of item `index`'s image before transforms; each dataset defines it."""

    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each item's image before transforms, for SizeBucketBatchSampler."""
        if self._sizes is None:
            self._sizes = [self._item_size(index) for index in range(len(self))]
        return list(self._sizes)


def _caption_pairs(records: Sequence[CaptionRecord | KarpathyRecord], per_caption: bool = True) -> np.ndarray:
    """(record index, caption index) of every caption (of each record's first caption when not per_caption),
    int64 [N, 2]. One array rather than N tuples: DataLoader workers touch every Python object they read,
    which copies it into each worker (millions of pairs with Visual Genome's region phrases)."""
    counts = np.array([len(r.captions) if per_caption else 1 for r in records], dtype=np.int64)
    record_index = np.repeat(np.arange(len(records), dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([record_index, np.arange(len(record_index), dtype=np.int64) - first], axis=1)


class _CaptionPairs(SeededDataset):
    """Items are (record, caption) pairs: ``self.pairs`` holds (record index, caption index)."""

    records: list
    pairs: np.ndarray  # int64 [N, 2]

    def __len__(self) -> int:
        return len(self.pairs)

    def _item_size(self, index: int) -> tuple[int, int]:
        return self._record_size(self.records[int(self.pairs[index, 0])])

    def _pair(self, index: int):
        """(record, caption index) of item `index` (already checked)."""
        record_index, caption_index = self.pairs[index].tolist()
        return self.records[record_index], caption_index


_NO_BOXES = (np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))


class PretrainingDataset(_CaptionPairs):
    """One item per (image, caption) pair, with the image's boxes joined from ``detections`` by image file (an
    image without detection annotations gets no boxes; joining by file keeps sources whose image ids overlap,
    such as COCO and Visual Genome, apart). Items are PretrainingCollator's samples:
    {"image" [3, H, W], "text", "boxes" [T, 4] cxcywh, "labels" [T], "attributes" [T] (-1 none), "image_id",
    "seed"}."""

    def __init__(self, captions: Sequence[CaptionRecord], detections: Sequence[DetectionRecord] | None = None,
                 transforms: Transforms | None = None, seed: int = 0):
        super().__init__(transforms, seed)
        self.records = list(captions)
        # image file → (boxes [T, 4] float32 cxcywh, labels [T] int64, attributes [T] int64): arrays rather than
        # lists of floats, so the workers do not each copy millions of Python numbers.
        self.detections: dict[Path, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for record in detections or ():
            if record.image_path in self.detections:
                raise ValueError(f"detections: image {record.image_path} appears in more than one record")
            self.detections[record.image_path] = (np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4),
                                                  np.asarray(record.labels, dtype=np.int64),
                                                  np.asarray(record.attributes, dtype=np.int64))
        self.pairs = _caption_pairs(self.records)
        if len(self.pairs) == 0:
            raise ValueError(f"captions: none of the {len(self.records)} records has a caption")

    def label_bounds(self) -> tuple[int, int]:
        """(1 + the largest class index, 1 + the largest attribute index) over the joined boxes."""
        def bound(arrays) -> int:
            return max((int(a.max()) + 1 for a in arrays if a.size), default=0)

        return (bound(labels for _, labels, _ in self.detections.values()),
                bound(attributes for _, _, attributes in self.detections.values()))

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        record, caption_index = self._pair(index)
        boxes, labels, attributes = self.detections.get(record.image_path, _NO_BOXES)
        sample = {"image": self.load(record.image_path), "text": record.captions[caption_index],
                  "boxes": torch.tensor(boxes),  # [T, 4] cxcywh
                  "labels": torch.tensor(labels),  # [T]
                  "attributes": torch.tensor(attributes),  # [T]
                  "image_id": record.image_id}
        return self._finish(sample, index)


class VQADataset(SeededDataset):
    """One item per question: {"image", "text" (the question), "boxes" [0, 4], "target" [num_answers] soft
    scores (zeros without answers), "question_id", "answers" (raw annotator answers or None), "seed"}.

    A flip swaps "left"/"right" in the question but not in the answers: for answer vocabularies that name a
    side, use transforms without RandomHorizontalFlip.
    """

    def __init__(self, records: Sequence[VQARecord], num_answers: int, transforms: Transforms | None = None,
                 seed: int = 0):
        super().__init__(transforms, seed)
        if isinstance(num_answers, bool) or not isinstance(num_answers, int) or num_answers < 1:
            raise ValueError(f"num_answers must be a positive int, got {num_answers!r}")
        self.records, self.num_answers = list(records), num_answers
        for record in self.records:
            bad = [i for i in (record.target or {}) if not 0 <= i < num_answers]
            if bad:
                raise ValueError(f"num_answers={num_answers} is too small: question {record.question_id} has "
                                 f"answer index {max(bad)} (num_answers must cover the reader's answer_vocab)")

    def __len__(self) -> int:
        return len(self.records)

    def _item_size(self, index: int) -> tuple[int, int]:
        return self._record_size(self.records[index])

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        record = self.records[index]
        target = torch.zeros(self.num_answers)  # [num_answers]
        for answer_index, score in (record.target or {}).items():
            target[answer_index] = score
        sample = {"image": self.load(record.image_path), "text": record.question, "boxes": _empty_boxes(),
                  "target": target, "question_id": record.question_id,
                  "answers": None if record.answers is None else list(record.answers)}
        return self._finish(sample, index)


def _flattened(transform: Transforms) -> Iterator[Transforms]:
    if isinstance(transform, Compose):
        for inner in transform.transforms:
            yield from _flattened(inner)
    else:
        yield transform


def split_flip(transforms: Transforms) -> tuple[float, Transforms]:
    """(flip probability, the other transforms) of a Compose (nested ones too) or a lone RandomHorizontalFlip.
    Any other callable comes back whole with probability 0: a flip hidden inside it is not found."""
    if not isinstance(transforms, (Compose, RandomHorizontalFlip)):
        return 0.0, transforms
    parts = list(_flattened(transforms))
    flips = [part for part in parts if isinstance(part, RandomHorizontalFlip)]
    if len(flips) > 1:
        raise ValueError(f"transforms: at most one RandomHorizontalFlip, got {len(flips)}")
    rest = Compose([part for part in parts if not isinstance(part, RandomHorizontalFlip)])
    return (flips[0].p if flips else 0.0), rest


class NLVR2Dataset(SeededDataset):
    """One item per statement: {"images": (left [3, H, W], right [3, H', W']), "text", "label" (1 true, 0 false,
    -1 unlabeled), "identifier", "seed"}.

    The flip of ``transforms`` is done here, on the pair: it mirrors the pair as one panorama, i.e. flips both
    images, swaps them and swaps "left"/"right" in the sentence, so the label stays right. The other transforms
    run on each image with identical draws, so both get the same resize choice.
    """

    def __init__(self, records: Sequence[NLVR2Record], transforms: Transforms | None = None, seed: int = 0):
        super().__init__(transforms, seed)
        self.records = list(records)
        self.flip_probability, self.image_transforms = split_flip(self.transforms)

    def __len__(self) -> int:
        return len(self.records)

    def _item_size(self, index: int) -> tuple[int, int]:
        """The pair's padded extent: the larger height and width of its two images."""
        record = self.records[index]
        (h0, w0), (h1, w1) = self._header_size(record.left_path), self._header_size(record.right_path)
        return max(h0, h1), max(w0, w1)

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        record = self.records[index]
        seed = self.item_seed(index)
        generator = torch.Generator().manual_seed(seed)
        # Both draws happen whatever the probability, so the resize choice does not depend on it.
        flip = float(torch.rand((), generator=generator)) < self.flip_probability
        image_seed = int(torch.randint(2**62, (), generator=generator))
        images, text = [], record.sentence
        for path in (record.left_path, record.right_path):
            sample = {"image": self.load(path), "boxes": _empty_boxes()}
            image = self._transformed(sample, self.image_transforms, torch.Generator().manual_seed(image_seed))["image"]
            images.append(image.flip(-1) if flip else image)  # [3, H, W]
        if flip:
            images.reverse()
            text = swap_left_right(text)
        label = -1 if record.label is None else int(record.label)
        return {"images": tuple(images), "text": text, "label": label, "identifier": record.identifier, "seed": seed}


class CaptionDataset(_CaptionPairs):
    """Images with their captions, for caption fine-tuning and for caption and retrieval evaluation.

    ``per_caption=True``: one item per caption (training). ``per_caption=False``: one item per image, its
    "text" the first caption ("" when it has none) — the image side of caption evaluation and of image-text
    retrieval (the texts to rank are the "references"). Items: {"image", "text", "references" (all the
    image's captions), "image_id", "boxes" [0, 4], "seed"}.
    """

    def __init__(self, records: Sequence[CaptionRecord] | Sequence[KarpathyRecord],
                 transforms: Transforms | None = None, seed: int = 0, per_caption: bool = True):
        super().__init__(transforms, seed)
        self.records, self.per_caption = list(records), per_caption
        self.pairs = _caption_pairs(self.records, per_caption)

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        record, caption_index = self._pair(index)
        text = record.captions[caption_index] if record.captions else ""
        sample = {"image": self.load(record.image_path), "text": text, "references": list(record.captions),
                  "image_id": record.image_id, "boxes": _empty_boxes()}
        return self._finish(sample, index)
