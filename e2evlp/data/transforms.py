"""DETR-style image transforms on dict samples: resize, horizontal flip (with left/right text swap), normalize."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)

Transform = Callable[[dict], dict]

_MASK64 = (1 << 64) - 1


def _image_size(image: Image.Image | Tensor) -> tuple[int, int]:
    """(width, height) of a PIL image or a [C, H, W] tensor."""
    if isinstance(image, Tensor):
        return image.shape[-1], image.shape[-2]
    return image.size


def resized_size(width: int, height: int, *, shorter: int, max_longer: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``shorter``, or the longer side ``max_longer`` if that is smaller."""
    scale = min(shorter / min(width, height), max_longer / max(width, height))
    # max(1, ...): a very elongated image must not collapse to zero pixels on its short side.
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize(image: Image.Image | Tensor, boxes_cxcywh: Tensor, *, shorter: int,
           max_longer: int) -> tuple[Image.Image | Tensor, Tensor]:
    """Scale so the shorter side is ``shorter`` unless the longer side would exceed ``max_longer`` (then scale
    the longer side to ``max_longer``), keeping the aspect ratio.

    Boxes come back unchanged: they are normalized by the image's own width and height, and resizing scales
    coordinates and image extent by the same factor per axis, so the ratios do not move.
    """
    width, height = _image_size(image)
    new_w, new_h = resized_size(width, height, shorter=shorter, max_longer=max_longer)
    if isinstance(image, Tensor):
        return TF.resize(image, [new_h, new_w], antialias=True), boxes_cxcywh
    return image.resize((new_w, new_h), Image.BILINEAR), boxes_cxcywh


def swap_left_right(text: str) -> str:
    """Swap the whole words "left" and "right", keeping their case ("Left" → "Right", "LEFT" → "RIGHT")."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _LEFT_RIGHT.sub(swap, text)


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform in [0, high). Without a generator this draws from torch's global RNG, which DataLoader reseeds
    in every worker — a shared Python RNG would repeat the same draws in each worker."""
    return int(torch.randint(high, (), generator=generator))


def _rand(generator: torch.Generator | None) -> float:
    """Uniform in [0, 1), from ``generator`` or torch's global RNG (see _randint)."""
    return float(torch.rand((), generator=generator))


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def mix_seeds(*values: int) -> int:
    """A well-spread, order-sensitive hash of integers into [0, 2**63): nearby inputs such as (seed, epoch,
    index) and (seed, epoch, index + 1) give unrelated generator seeds, and any int (negative too) is allowed."""
    state = _splitmix64(len(values))
    for value in values:
        state = _splitmix64(state ^ (int(value) & _MASK64))
    # 63 bits: the result stays a valid seed and fits a signed int64 tensor.
    return state >> 1


def accepts_generator(transform: Callable) -> bool:
    """Whether ``transform`` can be called with a ``generator=`` keyword."""
    try:
        parameters = inspect.signature(transform).parameters.values()
    except (TypeError, ValueError):  # some builtins have no inspectable signature
        return False
    return any(p.name == "generator" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def apply_transform(transform: Callable, sample: dict, generator: torch.Generator | None = None) -> dict:
    """``transform(sample, generator=generator)`` when it takes a generator (and one is given), else
    ``transform(sample)``: plain callables without randomness keep working in seeded pipelines."""
    if generator is not None and accepts_generator(transform):
        return transform(sample, generator=generator)
    return transform(sample)


class Compose:
    """Applies transforms in order; a per-call ``generator`` goes to every transform that accepts one."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)
        # Inspected once here rather than on every sample.
        self._takes_generator = [accepts_generator(transform) for transform in self.transforms]

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        for transform, takes_generator in zip(self.transforms, self._takes_generator):
            sample = transform(sample, generator=generator) if takes_generator else transform(sample)
        return sample


class RandomResize:
    """Resizes to a shorter side drawn uniformly from ``shorter_sizes``, longer side capped at ``max_longer``.

    Draws from the call's ``generator`` when given, else from the constructor's (else torch's global RNG).
    """

    def __init__(self, shorter_sizes: Sequence[int], max_longer: int, *, generator: torch.Generator | None = None):
        if not shorter_sizes:
            raise ValueError("shorter_sizes must not be empty")
        self.shorter_sizes, self.max_longer, self.generator = list(shorter_sizes), max_longer, generator

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        generator = generator if generator is not None else self.generator
        shorter = self.shorter_sizes[_randint(len(self.shorter_sizes), generator)]
        image, boxes = resize(sample["image"], sample["boxes"], shorter=shorter, max_longer=self.max_longer)
        return {**sample, "image": image, "boxes": boxes}


class RandomHorizontalFlip:
    """With probability ``p`` mirrors the image and the boxes (cx → 1 − cx) and swaps "left" ↔ "right" in the
    text and in the reference captions, so they still describe the flipped image.

    Draws from the call's ``generator`` when given, else from the constructor's (else torch's global RNG).
    """

    def __init__(self, p: float = 0.5, *, generator: torch.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.p, self.generator = p, generator

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        if _rand(generator if generator is not None else self.generator) >= self.p:
            return sample
        boxes = sample["boxes"].clone()  # [T, 4] cxcywh
        boxes[:, 0] = 1 - boxes[:, 0]
        flipped = {**sample, "image": TF.hflip(sample["image"]), "boxes": boxes}
        if "text" in sample:
            flipped["text"] = swap_left_right(sample["text"])
        if "references" in sample:
            flipped["references"] = [swap_left_right(reference) for reference in sample["references"]]
        return flipped


class Normalize:
    """PIL image (or float tensor in [0, 1]) → float tensor [3, H, W] standardized by ``mean`` and ``std``."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, sample: dict) -> dict:
        image = sample["image"]
        if not isinstance(image, Tensor):
            image = TF.to_tensor(image.convert("RGB"))  # [3, H, W] in [0, 1]
        return {**sample, "image": TF.normalize(image.float(), self.mean, self.std)}


def train_transforms(min_size: int = 480, max_size: int = 800, max_longer: int = 1333, step: int = 32, *,
                     generator: torch.Generator | None = None) -> Compose:
    """DETR's training resize: flip, shorter side in ``range(min_size, max_size + 1, step)``, longer ≤ max_longer."""
    return Compose([RandomHorizontalFlip(generator=generator),
                    RandomResize(range(min_size, max_size + 1, step), max_longer, generator=generator),
                    Normalize()])


def eval_transforms(size: int = 800, max_longer: int = 1333) -> Compose:
    """DETR's evaluation resize: shorter side ``size``, longer ≤ max_longer; no randomness."""
    return Compose([RandomResize([size], max_longer), Normalize()])
