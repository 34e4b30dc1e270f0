"""Collators for the fine-tuning tasks: VQA, NLVR2 and captioning (also the retrieval gallery) batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .collate import pad_images, tokenize


class _TaskCollator:
    """Shared pieces: argument checks, image padding and tokenization (as PretrainingCollator does them)."""

    def __init__(self, tokenizer, *, max_text_length: int = 40, size_divisibility: int = 32):
        # [CLS] and [SEP] take two positions: fewer leaves no room for a single word.
        if isinstance(max_text_length, bool) or not isinstance(max_text_length, int) or max_text_length < 3:
            raise ValueError(f"max_text_length must be an int >= 3, got {max_text_length!r}")
        if isinstance(size_divisibility, bool) or not isinstance(size_divisibility, int) or size_divisibility < 1:
            raise ValueError(f"size_divisibility must be a positive int, got {size_divisibility!r}")
        self.tokenizer = tokenizer
        self.max_text_length, self.size_divisibility = max_text_length, size_divisibility

    @staticmethod
    def _check(samples: Sequence[dict], keys: Sequence[str]) -> None:
        if not samples:
            raise ValueError("samples: a batch needs at least one sample")
        for i, sample in enumerate(samples):
            missing = [key for key in keys if key not in sample]
            if missing:
                raise ValueError(f"samples[{i}] lacks {missing} (keys present: {sorted(sample)})")

    def _pixels(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        return pad_images(images, size_divisibility=self.size_divisibility)  # [N, 3, H, W], [N, H, W]

    def _text(self, samples: Sequence[dict]) -> tuple[Tensor, Tensor]:
        return tokenize(self.tokenizer, [sample["text"] for sample in samples], self.max_text_length)  # [B, L]


class VQACollator(_TaskCollator):
    """VQADataset items → E2EVLPForVQA.forward's pixel_values, pixel_mask, input_ids, attention_mask and labels
    [B, num_answers] (soft scores), plus the metadata question_ids and answers."""

    def __call__(self, samples: list[dict]) -> dict:
        self._check(samples, ("image", "text", "target", "question_id", "answers"))
        widths = {sample["target"].shape[-1] for sample in samples}
        if len(widths) != 1:
            raise ValueError(f"samples: targets have different num_answers {sorted(widths)}")
        pixel_values, pixel_mask = self._pixels([sample["image"] for sample in samples])
        input_ids, attention_mask = self._text(samples)
        labels = torch.stack([sample["target"].float() for sample in samples])  # [B, num_answers]
        return dict(pixel_values=pixel_values, pixel_mask=pixel_mask, input_ids=input_ids,
                    attention_mask=attention_mask, labels=labels,
                    question_ids=[sample["question_id"] for sample in samples],
                    answers=[sample["answers"] for sample in samples])


class NLVR2Collator(_TaskCollator):
    """NLVR2Dataset items → E2EVLPForNLVR2.forward's pixel_values [B, 2, 3, H, W], pixel_mask [B, 2, H, W] (all 2B
    images padded to one size), input_ids, attention_mask and labels [B], plus the metadata identifiers.

    An unlabeled batch (hidden test split, label -1) has no "labels"; a batch mixing labeled and unlabeled
    statements is an error, since its loss would silently cover only part of it.
    """

    def __call__(self, samples: list[dict]) -> dict:
        self._check(samples, ("images", "text", "label", "identifier"))
        for i, sample in enumerate(samples):
            if len(sample["images"]) != 2:
                raise ValueError(f"samples[{i}]['images'] must be a (left, right) pair, got {len(sample['images'])}")
        B = len(samples)
        pixel_values, pixel_mask = self._pixels([image for sample in samples for image in sample["images"]])
        input_ids, attention_mask = self._text(samples)
        batch = dict(pixel_values=pixel_values.view(B, 2, *pixel_values.shape[1:]),  # [B, 2, 3, H, W]
                     pixel_mask=pixel_mask.view(B, 2, *pixel_mask.shape[1:]),  # [B, 2, H, W]
                     input_ids=input_ids, attention_mask=attention_mask)
        labels = [int(sample["label"]) for sample in samples]
        unlabeled = labels.count(-1)
        if 0 < unlabeled < B:
            raise ValueError(f"samples: {unlabeled} of {B} statements are unlabeled (label -1); keep labeled and "
                             "unlabeled splits in separate batches")
        if unlabeled == 0:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)  # [B]
        batch["identifiers"] = [sample["identifier"] for sample in samples]
        return batch


class CaptionCollator(_TaskCollator):
    """CaptionDataset items → E2EVLPForCaptioning.forward's pixel_values, pixel_mask, caption_ids and
    caption_mask ([CLS] caption [SEP], at most ``max_caption_length`` tokens), plus the metadata image_ids and
    references."""

    def __init__(self, tokenizer, *, max_caption_length: int = 40, size_divisibility: int = 32):
        super().__init__(tokenizer, max_text_length=max_caption_length, size_divisibility=size_divisibility)

    def __call__(self, samples: list[dict]) -> dict:
        self._check(samples, ("image", "text", "image_id", "references"))
        pixel_values, pixel_mask = self._pixels([sample["image"] for sample in samples])
        caption_ids, caption_mask = self._text(samples)
        return dict(pixel_values=pixel_values, pixel_mask=pixel_mask, caption_ids=caption_ids,
                    caption_mask=caption_mask, image_ids=[sample["image_id"] for sample in samples],
                    references=[list(sample["references"]) for sample in samples])
