"""AdamW parameter groups (backbone learning rate, no decay on biases and norms) and warmup schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

DECAYS = ("cosine", "linear")
# _NormBase is the common base of every BatchNorm and InstanceNorm variant.
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def _is_backbone(name: str) -> bool:
    # A leading dot lets a top-level "backbone." match the same test as a nested ".backbone.".
    return ".backbone." in f".{name}"


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that weight decay would only bias: every 1-D tensor (biases, norm scales) and norm weights."""
    names = {name for name, p in model.named_parameters() if p.ndim < 2}
    for module_name, module in model.named_modules():
        if isinstance(module, NORMS):
            names.update(f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False))
    return names


def param_groups(model: nn.Module, *, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: the backbone at `backbone_lr`, the rest at `lr`; biases and norms without decay.

    Only trainable parameters are included, each exactly once (a tied tensor under its first name)."""
    no_decay = _no_decay_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():  # yields a tied tensor once
        if p.requires_grad:
            groups.setdefault((_is_backbone(name), name not in no_decay), []).append(p)
    result = [{"name": ("backbone" if backbone else "main") + ("" if decay else "_no_decay"), "params": params,
               "lr": backbone_lr if backbone else lr, "weight_decay": weight_decay if decay else 0.0}
              for (backbone, decay), params in sorted(groups.items())]
    grouped = [id(p) for g in result for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable, "every trainable parameter exactly once"
    return result


def build_optimizer(model: nn.Module, *, lr: float = 1e-4, backbone_lr: float = 1e-5, weight_decay: float = 0.01,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; fused by default when every trainable parameter lives on CUDA."""
    groups = param_groups(model, lr=lr, backbone_lr=backbone_lr, weight_decay=weight_decay)
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def warmup_schedule(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    decay: str = "cosine", min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to each group's lr over `warmup_steps`, then `decay` to `min_ratio` of it at
    `total_steps`, constant after."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        span = total_steps - warmup_steps
        # span == 0 (warmup_steps == total_steps) leaves no decay phase: straight to min_ratio.
        progress = 1.0 if span == 0 else min(1.0, (step - warmup_steps) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
