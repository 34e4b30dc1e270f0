"""Data helpers only the tests use: tiny transform presets, a matched image-text collator, Karpathy records as
CaptionRecords and the split of a task batch into model inputs and metadata."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from e2evlp.data.datasets import image_header_size
from e2evlp.data.readers_coco import CaptionRecord, KarpathyRecord
from e2evlp.data.task_collate import _TaskCollator
from e2evlp.data.transforms import Compose, eval_transforms, train_transforms

# Batch keys of the task collators that are not arguments of a model's forward.
METADATA_KEYS = ("question_ids", "answers", "identifiers", "image_ids", "references")


def split_metadata(batch: dict) -> tuple[dict, dict]:
    """(model inputs, metadata): ``model(**inputs)`` gets only forward's arguments."""
    inputs = {key: value for key, value in batch.items() if key not in METADATA_KEYS}
    return inputs, {key: value for key, value in batch.items() if key in METADATA_KEYS}


class ImageTextCollator(_TaskCollator):
    """Matched (image, text) items → pixel_values, pixel_mask, input_ids, attention_mask (no masking, no
    negatives) for ITM scoring with E2EVLPForRetrieval, plus the metadata image_ids."""

    def __call__(self, samples: list[dict]) -> dict:
        self._check(samples, ("image", "text", "image_id"))
        pixel_values, pixel_mask = self._pixels([sample["image"] for sample in samples])
        input_ids, attention_mask = self._text(samples)
        return dict(pixel_values=pixel_values, pixel_mask=pixel_mask, input_ids=input_ids,
                    attention_mask=attention_mask, image_ids=[sample["image_id"] for sample in samples])


def caption_records_from_karpathy(records: Sequence[KarpathyRecord]) -> list[CaptionRecord]:
    """CaptionRecords for Karpathy-split records, width and height read from each image header. image_id stays
    Karpathy's "imgid", which does not join with COCO instances."""
    converted = []
    for record in records:
        height, width = image_header_size(record.image_path)
        converted.append(CaptionRecord(record.image_id, record.image_path, width, height, list(record.captions)))
    return converted


def tiny_train_transforms(*, generator: torch.Generator | None = None) -> Compose:
    """Small images for the tests: shorter side 64–96, longer ≤ 128."""
    return train_transforms(64, 96, 128, step=16, generator=generator)


def tiny_eval_transforms() -> Compose:
    """Evaluation twin of tiny_train_transforms: shorter side 80, longer ≤ 128."""
    return eval_transforms(80, 128)
