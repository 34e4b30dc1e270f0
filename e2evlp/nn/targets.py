"""DETR-style target lists (one dict per image) packed into padded batch tensors without per-image kernels."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from e2evlp.ops.boxes import validate_boxes

MIN_BUCKET = 8


def pinned_to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` on `device`; a host tensor goes to a GPU through pinned memory, so the copy does not block
    (a copy from pageable memory waits for the stream: one host sync each). A traced graph copies directly."""
    tensor = tensor.to(dtype) if dtype is not None else tensor
    if device.type == "cuda" and tensor.device.type == "cpu" and not torch.compiler.is_compiling():
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, non_blocking=True)


def bucketed_length(n: int) -> int:
    """The padded target count for `n` targets: the next power of two, at least MIN_BUCKET, so that
    batches whose largest image has 9 or 16 objects share one shape (and one compiled graph)."""
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


@dataclass
class PaddedTargets:
    """A batch's targets as fixed-shape tensors: image b's first num_targets[b] slots are real."""

    labels: torch.Tensor  # [B, T] int64, 0 in padding
    boxes: torch.Tensor  # [B, T, 4] cxcywh, 0.5 in padding (a valid box)
    attributes: torch.Tensor | None  # [B, T] int64, -1 in padding and for "no attribute"
    num_targets: torch.Tensor  # [B] int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def valid(self) -> torch.Tensor:
        """[B, T] bool: the real (non-padding) slots."""
        slots = torch.arange(self.labels.shape[1], device=self.labels.device)
        return slots[None, :] < self.num_targets[:, None]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PaddedTargets:
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                for f in fields(self) if getattr(self, f.name) is not None})

    def pin_memory(self) -> PaddedTargets:
        """Called by DataLoader(pin_memory=True), so the step's copy to the GPU does not block."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory()
                                for f in fields(self) if getattr(self, f.name) is not None})

    def to_list(self) -> list[dict]:
        """DETR's format again: one dict per image (one host read of the counts)."""
        out = []
        for b, n in enumerate(self.num_targets.tolist()):
            t = {"labels": self.labels[b, :n], "boxes": self.boxes[b, :n]}
            if self.attributes is not None:
                t["attributes"] = self.attributes[b, :n]
            out.append(t)
        return out


def validate_targets(padded: PaddedTargets) -> None:
    """Raises ValueError naming ``targets[i]['boxes']`` for NaN boxes or a negative width or height (cxcywh).
    Reads the boxes on the host: the collator calls it (padded_targets=True), so compiled steps need not."""
    for i, (boxes, n) in enumerate(zip(padded.boxes, padded.num_targets.tolist())):
        validate_boxes(boxes[:n], f"targets[{i}]['boxes']", "cxcywh")


def pad_targets(targets: list[dict] | PaddedTargets, device: torch.device | str, *,
                bucket: bool = False) -> PaddedTargets:
    """Packs `targets` (dicts with labels [T_i], boxes [T_i, 4], optional attributes [T_i]) into [B, T],
    T = max(max T_i, 1), or `bucketed_length` of it with ``bucket=True``. PaddedTargets pass through, moved to `device`.

    The slot indices are built on the host from the list's lengths (constants to a traced graph, which
    therefore recompiles when they change: compiled steps take PaddedTargets from the collator), and each
    field is copied to `device` once."""
    device = torch.device(device)
    if isinstance(targets, PaddedTargets):
        return targets.to(device, non_blocking=True)
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets must be a list of dicts (one per image) or PaddedTargets, "
                        f"got {type(targets).__name__}")
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or "labels" not in t or "boxes" not in t:
            raise KeyError(f"targets[{i}] must be a dict with 'labels' and 'boxes'")
        if t["boxes"].shape != (len(t["labels"]), 4):
            raise ValueError(f"targets[{i}]['boxes'] must be [{len(t['labels'])}, 4], got {tuple(t['boxes'].shape)}")
    sizes = [len(t["labels"]) for t in targets]
    B, T = len(targets), max(sizes, default=0)
    T = bucketed_length(T) if bucket else max(T, 1)  # one slot at least: gathers need a column to point at
    with_attributes = B > 0 and all("attributes" in t for t in targets)
    box_dtype = targets[0]["boxes"].dtype if B else torch.float32
    labels = torch.zeros(B * T, dtype=torch.int64, device=device)
    boxes = torch.full((B * T, 4), 0.5, dtype=box_dtype, device=device)
    attributes = torch.full((B * T,), -1, dtype=torch.int64, device=device) if with_attributes else None
    if sum(sizes):
        index = torch.tensor([b * T + j for b, n in enumerate(sizes) for j in range(n)], dtype=torch.int64)
        index = pinned_to_device(index, device)
        labels[index] = pinned_to_device(torch.cat([t["labels"] for t in targets]), device, torch.int64)
        boxes[index] = pinned_to_device(torch.cat([t["boxes"] for t in targets]), device, box_dtype)
        if attributes is not None:
            attributes[index] = pinned_to_device(torch.cat([t["attributes"] for t in targets]), device, torch.int64)
    return PaddedTargets(labels.view(B, T), boxes.view(B, T, 4), None if attributes is None else attributes.view(B, T),
                         pinned_to_device(torch.tensor(sizes, dtype=torch.int64), device))
