"""Visual backbone: ResNet (frozen BN) or a tiny CNN, a 1x1 projection and DETR's 2-D sine positions as tokens."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from e2evlp.models.config import BACKBONES


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d in eval mode with statistics and affine parameters fixed (buffers, so no optimizer sees them).

    Pre-trained detection backbones are fine-tuned with batches of a few large images, too few for useful batch
    statistics; freezing keeps the ImageNet statistics. Keys match nn.BatchNorm2d so torchvision checkpoints load.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nn.BatchNorm2d checkpoints carry a step counter that means nothing here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        # One fused scale and shift per channel: (x - mean) / sqrt(var + eps) * weight + bias.
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class SinePositionEncoding(nn.Module):
    """DETR's 2-D sine position embedding of a feature grid, counted over real (unpadded) pixels only.

    Positions are cumulative counts of real cells along each axis, so padding added to the right or bottom of an
    image leaves its real cells' encoding unchanged; with `normalize`, counts are divided by the real extent and
    multiplied by `scale`, so the last real row/column sits at `scale` whatever the image size.
    """

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi):
        super().__init__()
        if num_pos_feats < 1:
            raise ValueError(f"num_pos_feats must be positive, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [B, h, w] bool, True = real -> [B, 2 * num_pos_feats, h, w] float32 (y half, then x half)."""
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool [B, h, w] tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
        real = mask.to(torch.float32)
        y = real.cumsum(1)  # [B, h, w] 1-based row among the real cells of its column
        x = real.cumsum(2)  # [B, h, w]
        if self.normalize:
            eps = 1e-6  # an all-padding image divides 0 by eps, not by 0
            y = y / (y[:, -1:, :] + eps) * self.scale
            x = x / (x[:, :, -1:] + eps) * self.scale
        k = torch.arange(self.num_pos_feats, device=mask.device)
        # Feature pairs (2i, 2i+1) share one frequency; the even one takes the sine, the odd one the cosine.
        inv_freq = self.temperature ** (-(2 * (k // 2)).to(torch.float32) / self.num_pos_feats)  # [F]
        use_sin = k % 2 == 0

        def embed(t: torch.Tensor) -> torch.Tensor:  # [B, h, w] -> [B, h, w, F]
            angle = t[..., None] * inv_freq
            return torch.where(use_sin, angle.sin(), angle.cos())

        return torch.cat([embed(y), embed(x)], dim=3).permute(0, 3, 1, 2)  # [B, 2F, h, w]


class TinyCNN(nn.Module):
    """Four stride-2 3x3 conv + ReLU stages (total stride 16) for the `tiny` preset, cheap enough to train on a CPU.

    No normalization layer: trained from scratch, a frozen BN would be an identity, and a batch-statistics BN would
    make an image's features depend on the other images (and padding) in its batch.
    """

    def __init__(self, out_channels: int = 64):
        super().__init__()
        # e.g. 16, 32, 64, 64. With 8, 16, 32 early channels the demo's detector and captioner kept confusing the
        # shapes for over twice as many steps (measured together with the demo's other settings).
        widths = [max(16, out_channels // 4), max(16, out_channels // 2), out_channels, out_channels]
        stages, in_channels = [], 3
        for width in widths:
            conv = nn.Conv2d(in_channels, width, kernel_size=3, stride=2, padding=1)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            stages.append(nn.Sequential(conv, nn.ReLU(inplace=True)))
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.stride = 2 ** len(stages)
        self.num_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, C, ceil(H/16), ceil(W/16)]
        for stage in self.stages:
            x = stage(x)
        return x


class VisualTokens(NamedTuple):
    tokens: torch.Tensor  # [B, h*w, hidden] projected features, row-major over the grid
    position: torch.Tensor  # [B, h*w, hidden] sine position encoding, same dtype as tokens
    padding_mask: torch.Tensor  # [B, h*w] bool, True = padding (nn.MultiheadAttention's key_padding_mask)
    grid: tuple[int, int]  # (h, w)


def _load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights_path {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(f"loading {path.name} needs the safetensors package (pip install safetensors)") from err
        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"weights_path {str(path)!r} must hold a state_dict, got {type(state).__name__}")
    return state


def _first_few(items: list[str], n: int = 8) -> str:
    """Error-message listing: a few items, and the total when there are more."""
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


class VisualBackbone(nn.Module):
    """Pixels -> visual tokens for the single-stream encoder: CNN features, 1x1 projection, sine positions.

    `trainable_stages` of the four stages train, counted from the last; the ResNet stem is always frozen
    (DETR's recipe). `dilation` replaces the last stage's stride by dilation (DETR's DC5, total stride 16).
    """

    def __init__(self, name: str = "resnet50", hidden_size: int = 768, trainable_stages: int = 3,
                 weights_path: str | Path | None = None, dilation: bool = False):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"name must be one of {', '.join(BACKBONES)}; got {name!r}")
        if hidden_size < 2 or hidden_size % 2:
            raise ValueError(f"hidden_size must be even (half of it encodes y, half x), got {hidden_size}")
        if not isinstance(trainable_stages, int) or not 0 <= trainable_stages <= 4:
            raise ValueError(f"trainable_stages must be an int in 0..4, got {trainable_stages!r}")
        if name == "tiny":
            if dilation:
                raise ValueError("dilation applies to ResNet backbones only, not to 'tiny'")
            self.body = TinyCNN(hidden_size)
            self.num_channels, self.stride = self.body.num_channels, self.body.stride
            stem, stages = [], list(self.body.stages)
        else:
            if dilation and name in ("resnet18", "resnet34"):
                raise ValueError(f"dilation needs a bottleneck ResNet (resnet50, resnet101), not {name!r}")
            resnet = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d,
                                                       replace_stride_with_dilation=[False, False, dilation])
            self.num_channels = resnet.fc.in_features
            self.stride = 16 if dilation else 32
            # Same child names as torchvision's ResNet, so its checkpoints load key for key (minus avgpool, fc).
            names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
            self.body = nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in names))
            stem, stages = list(self.body[:4]), list(self.body[4:])
        if weights_path is not None:
            self._load_body(weights_path)
        for module in stem + stages[:4 - trainable_stages]:
            module.requires_grad_(False)
        self.hidden_size = hidden_size
        self.proj = nn.Conv2d(self.num_channels, hidden_size, kernel_size=1)
        self.position = SinePositionEncoding(hidden_size // 2)

    def _load_body(self, path: str | Path) -> None:
        state = _load_state_dict_file(path)
        # The classifier is dropped and the frozen BN has no step counter.
        state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
        expected = self.body.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            problems = ([f"missing keys: {_first_few(missing)}"] if missing else []) + (
                [f"unexpected keys: {_first_few(unexpected)}"] if unexpected else [])
            raise ValueError(f"weights_path {str(path)!r} is not a torchvision-style state_dict for this backbone; "
                             + "; ".join(problems))
        wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                 for k, v in expected.items() if state[k].shape != v.shape]
        if wrong:
            raise ValueError(f"weights_path {str(path)!r}: shape mismatch for {_first_few(wrong)}")
        self.body.load_state_dict(state)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> VisualTokens:
        """pixel_values [B, 3, H, W] float; pixel_mask [B, H, W] bool (True = real pixel) or None (all real)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got shape {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")
        B, _, H, W = pixel_values.shape
        if H < self.stride or W < self.stride:
            raise ValueError(f"images must be at least {self.stride}x{self.stride} pixels for this backbone, "
                             f"got {H}x{W}")
        if pixel_mask is None:
            pixel_mask = torch.ones(B, H, W, dtype=torch.bool, device=pixel_values.device)
        else:
            if pixel_mask.dim() != 3:
                raise ValueError(f"pixel_mask must be [B, H, W] = [{B}, {H}, {W}], got shape {tuple(pixel_mask.shape)}")
            if pixel_mask.shape[0] != B:
                raise ValueError(f"pixel_mask has batch size {pixel_mask.shape[0]} but pixel_values has {B}")
            if pixel_mask.shape[1:] != (H, W):
                raise ValueError(f"pixel_mask must be [B, H, W] = [{B}, {H}, {W}], got shape {tuple(pixel_mask.shape)}")
            if pixel_mask.is_floating_point() or pixel_mask.is_complex():
                raise TypeError(f"pixel_mask must be bool (or integer, nonzero = real), got {pixel_mask.dtype}")
            pixel_mask = pixel_mask != 0
        features = self.proj(self.body(pixel_values))  # [B, hidden, h, w]
        h, w = features.shape[-2:]
        # Nearest downsampling as DETR does: a cell is real when its sampled pixel is.
        real = F.interpolate(pixel_mask[None].float(), size=(h, w))[0].bool()  # [B, h, w]
        position = self.position(real).to(features.dtype)  # [B, hidden, h, w]
        return VisualTokens(
            tokens=features.flatten(2).transpose(1, 2),  # [B, h*w, hidden]
            position=position.flatten(2).transpose(1, 2),  # [B, h*w, hidden]
            padding_mask=~real.flatten(1),  # [B, h*w]
            grid=(int(h), int(w)),
        )
