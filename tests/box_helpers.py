"""Random boxes and DETR-style batches for the box, matcher and criterion tests."""

import torch


def random_cxcywh(n: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Non-degenerate normalized cxcywh boxes."""
    centers = torch.rand(n, 2, generator=generator, dtype=dtype) * 0.6 + 0.2
    sizes = torch.rand(n, 2, generator=generator, dtype=dtype) * 0.3 + 0.05
    return torch.cat([centers, sizes], dim=1)


def random_xyxy(n: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    cx, cy, w, h = random_cxcywh(n, generator, dtype).unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def detr_batch(sizes, queries: int, classes: int, generator: torch.Generator, dtype=torch.float32, layers: int = 1,
               attributes: int | None = None, device="cpu"):
    """Outputs (with aux_outputs for layers > 1) and DETR targets: one dict per image."""
    B = len(sizes)

    def layer():
        out = {"pred_logits": torch.randn(B, queries, classes + 1, generator=generator, dtype=dtype).to(device),
               "pred_boxes": random_cxcywh(B * queries, generator, dtype).view(B, queries, 4).to(device)}
        if attributes:
            out["pred_attributes"] = torch.randn(B, queries, attributes, generator=generator, dtype=dtype).to(device)
        return out

    outputs = layer()
    if layers > 1:
        outputs["aux_outputs"] = [layer() for _ in range(layers - 1)]
    targets = []
    for n in sizes:
        t = {"labels": torch.randint(0, classes, (n,), generator=generator).to(device),
             "boxes": random_cxcywh(n, generator, dtype).to(device)}
        if attributes:
            t["attributes"] = torch.randint(-1, attributes, (n,), generator=generator).to(device)
        targets.append(t)
    return outputs, targets


def matching_inputs(sizes, Q, C, seed, dtype=torch.float32, focal=False):
    """Padded matching_cost inputs: logits, boxes, labels [B, T], target boxes [B, T, 4], counts [B]."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(sizes), max(sizes, default=0)
    logits = torch.randn(B, Q, C if focal else C + 1, generator=g, dtype=dtype)
    boxes = random_cxcywh(B * Q, g, dtype).view(B, Q, 4)
    labels = torch.randint(0, C, (B, T), generator=g)
    tboxes = random_cxcywh(B * T, g, dtype).view(B, T, 4)
    return logits, boxes, labels, tboxes, torch.tensor(sizes)
