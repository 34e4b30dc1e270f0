"""DETR-style target lists (one dict per image) packed into padded batch tensors without per-image kernels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def pinned_to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` on `device`; a host tensor goes to a GPU through pinned memory, so the copy does not block
    (a copy from pageable memory waits for the stream: one host sync each)."""
    tensor = tensor.to(dtype) if dtype is not None else tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def host_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host-built index array on `device`, without blocking."""
    return pinned_to_device(torch.from_numpy(array), device)


@dataclass
class PaddedTargets:
    labels: torch.Tensor  # [B, T] int64, 0 in padding
    boxes: torch.Tensor  # [B, T, 4] cxcywh, 0.5 in padding (a valid box)
    attributes: torch.Tensor | None  # [B, T] int64, -1 in padding and for "no attribute"
    num_targets: torch.Tensor  # [B] int64 on the device
    sizes: list[int]  # the same counts, on the host

    @property
    def total(self) -> int:
        return sum(self.sizes)


def pad_targets(targets: list[dict], device: torch.device | str) -> PaddedTargets:
    """Packs `targets` (dicts with labels [T_i], boxes [T_i, 4], optional attributes [T_i]) into [B, T_max]."""
    device = torch.device(device)
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets must be a list of dicts (one per image), got {type(targets).__name__}")
    for i, t in enumerate(targets):
        if "labels" not in t or "boxes" not in t:
            raise KeyError(f"targets[{i}] must have 'labels' and 'boxes'")
        if t["boxes"].shape != (len(t["labels"]), 4):
            raise ValueError(f"targets[{i}]['boxes'] must be [{len(t['labels'])}, 4], got {tuple(t['boxes'].shape)}")
    sizes = [len(t["labels"]) for t in targets]
    B, T = len(targets), max(sizes, default=0)
    with_attributes = B > 0 and all("attributes" in t for t in targets)
    box_dtype = targets[0]["boxes"].dtype if B else torch.float32
    labels = torch.zeros(B * T, dtype=torch.int64, device=device)
    boxes = torch.full((B * T, 4), 0.5, dtype=box_dtype, device=device)
    attributes = torch.full((B * T,), -1, dtype=torch.int64, device=device) if with_attributes else None
    if sum(sizes):
        counts = np.asarray(sizes, dtype=np.int64)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        slots = np.repeat(np.arange(B, dtype=np.int64) * T, counts) + np.arange(counts.sum()) - starts
        index = host_to_device(slots, device)
        labels[index] = pinned_to_device(torch.cat([t["labels"] for t in targets]), device, torch.int64)
        boxes[index] = pinned_to_device(torch.cat([t["boxes"] for t in targets]), device, box_dtype)
        if attributes is not None:
            attributes[index] = pinned_to_device(torch.cat([t["attributes"] for t in targets]), device, torch.int64)
    return PaddedTargets(labels.view(B, T), boxes.view(B, T, 4), None if attributes is None else attributes.view(B, T),
                         host_to_device(np.asarray(sizes, dtype=np.int64), device), sizes)
