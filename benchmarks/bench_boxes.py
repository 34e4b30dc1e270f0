"""DETR box ops: e2evlp's fused matching cost and box losses vs plain PyTorch (e2evlp.reference, torchvision).

Shapes are DETR's: B images, Q = 100 queries, C = 91 classes (+ no-object), T ~ U[0, 50] targets per image,
padded to the batch maximum with per-image counts; DETR's weights (class 1, L1 5, GIoU 2). Comparisons:
  * "matching_cost" (no gradient), what the matcher feeds its solver:
      e2evlp      ops.matching_cost, one fused kernel → padded [B, Q, T_max];
      reference   e2evlp.reference.matching_cost: a DETR cost block per image, in a Python loop;
      detr        DETR's matcher: one [B·Q, ΣT] matrix across the batch (softmax, torch.cdist and
                  torchvision's generalized_box_iou), of which only the diagonal blocks are used.
  * "box_losses" on the ΣT matched pairs, "fwd" (with grad enabled) and "fwd+bwd":
      e2evlp      ops.box_losses, fused forward and backward;
      reference   DETR's loss_boxes: L1 and 1 − the diagonal of torchvision's [P, P] GIoU matrix;
      torchvision L1 and torchvision.ops.generalized_box_iou_loss on the aligned pairs.
Every answer (costs on the valid entries; losses and their gradients) is checked against the reference first.
On the CPU, "e2evlp-1-thread" is e2evlp on one intra-op thread, the floor its threaded kernels must never fall
below, and the largest batch is timed again with every core but one kept busy by another process.

    python -m benchmarks.bench_boxes [e2evlp bench options]   (the same as: e2evlp bench boxes ...)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.ops

from benchmarks.common import busy_cores, environment, make_record, single_threaded, time_interleaved
from e2evlp import cli, ops, reference

BENCH = "boxes"
BASELINE = "reference"  # the column the Markdown table's speed-ups are relative to
QUERIES, CLASSES, MAX_TARGETS = 100, 91, 50
WEIGHTS = dict(w_class=1.0, w_bbox=5.0, w_giou=2.0)
LOSS_WEIGHTS = (5.0, 2.0)  # L1, GIoU, as DETR weighs them in the total loss
TOLERANCE = 1e-4


@dataclass
class Batch:
    """One batch of predictions and targets, padded ([B, T_max]) and concatenated (ΣT) as each side takes it."""

    logits: torch.Tensor  # [B, Q, C + 1]
    boxes: torch.Tensor  # [B, Q, 4] cxcywh
    labels: torch.Tensor  # [B, T_max]
    tgt_boxes: torch.Tensor  # [B, T_max, 4]
    num_targets: torch.Tensor  # [B]
    counts: list[int]

    @property
    def flat_labels(self) -> torch.Tensor:
        return torch.cat([self.labels[b, :n] for b, n in enumerate(self.counts)])

    @property
    def flat_tgt_boxes(self) -> torch.Tensor:
        return torch.cat([self.tgt_boxes[b, :n] for b, n in enumerate(self.counts)])


def random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    """Normalized cxcywh boxes that stay inside the image, as a trained DETR predicts them."""
    return torch.cat([torch.rand(n, 2, generator=gen) * 0.6 + 0.2, torch.rand(n, 2, generator=gen) * 0.3 + 0.05], 1)


def make_batch(B: int, device: str, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, MAX_TARGETS + 1, (B,), generator=gen)
    width = max(int(counts.max()), 1)
    labels = torch.randint(0, CLASSES, (B, width), generator=gen)
    tgt_boxes = random_boxes(B * width, gen).view(B, width, 4)  # the padding holds valid boxes too
    logits = torch.randn(B, QUERIES, CLASSES + 1, generator=gen)
    boxes = random_boxes(B * QUERIES, gen).view(B, QUERIES, 4)
    return Batch(logits.to(device), boxes.to(device), labels.to(device), tgt_boxes.to(device), counts.to(device),
                 counts.tolist())


def detr_cost(batch: Batch) -> torch.Tensor:
    """DETR's matcher cost: every query of the batch against every target of the batch, [B·Q, ΣT]."""
    return reference.cost_block(batch.logits.flatten(0, 1), batch.boxes.flatten(0, 1), batch.flat_labels,
                                batch.flat_tgt_boxes, **WEIGHTS)


def cost_impls(batch: Batch) -> dict:
    return {
        "e2evlp": lambda: ops.matching_cost(batch.logits, batch.boxes, batch.labels, batch.tgt_boxes,
                                            batch.num_targets, **WEIGHTS, validate=False),
        "reference": lambda: reference.matching_cost(batch.logits, batch.boxes, batch.labels, batch.tgt_boxes,
                                                     batch.num_targets, **WEIGHTS),
        "detr": lambda: detr_cost(batch),
    }


def check_costs(batch: Batch) -> None:
    want = reference.matching_cost(batch.logits, batch.boxes, batch.labels, batch.tgt_boxes, batch.num_targets,
                                   **WEIGHTS)
    B = len(batch.counts)
    detr_blocks = detr_cost(batch).view(B, QUERIES, -1).split(batch.counts, -1)
    got = {"e2evlp": [ops.matching_cost(batch.logits, batch.boxes, batch.labels, batch.tgt_boxes, batch.num_targets,
                                        **WEIGHTS)[b, :, :n] for b, n in enumerate(batch.counts)],
           "detr": [block[b] for b, block in enumerate(detr_blocks)]}
    for name, blocks in got.items():
        for b, n in enumerate(batch.counts):
            if not torch.allclose(blocks[b], want[b, :, :n], atol=TOLERANCE, rtol=TOLERANCE):
                raise AssertionError(f"{name}'s matching cost differs from the reference on image {b}")


def torchvision_box_losses(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    l1 = F.l1_loss(pred, target, reduction="none").sum(-1)
    giou = torchvision.ops.generalized_box_iou_loss(ops.box_cxcywh_to_xyxy(pred), ops.box_cxcywh_to_xyxy(target))
    return l1, giou


LOSSES = {"e2evlp": lambda p, t: ops.box_losses(p, t, validate=False), "reference": reference.box_losses,
          "torchvision": torchvision_box_losses}


def matched_pairs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictions the matcher would pair with the ΣT targets (the first T_i queries of each image), as a leaf."""
    pred = torch.cat([batch.boxes[b, :n] for b, n in enumerate(batch.counts)])
    return pred.detach().clone().requires_grad_(), batch.flat_tgt_boxes


def loss_and_grad(losses, pred: torch.Tensor, target: torch.Tensor):
    l1, giou = losses(pred, target)
    total = LOSS_WEIGHTS[0] * l1.sum() + LOSS_WEIGHTS[1] * giou.sum()
    return l1, giou, torch.autograd.grad(total, pred)[0]


def check_losses(pred: torch.Tensor, target: torch.Tensor) -> None:
    want = loss_and_grad(reference.box_losses, pred, target)
    for name, losses in LOSSES.items():
        for what, got, expected in zip(("L1", "GIoU", "gradient"), loss_and_grad(losses, pred, target), want):
            if not torch.allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE):
                raise AssertionError(f"{name}'s {what} differs from the reference")


def cases(device: str, quick: bool) -> list[int]:
    """Batch sizes; DETR's cross-batch matrix grows with B², which bounds the largest."""
    if device == "cuda":
        return [8, 64, 256] if quick else [8, 32, 64, 128, 256]
    return [2, 8, 32] if quick else [8, 32, 64, 128]


def run(device: str, quick: bool, repeat: int | None = None) -> tuple[list[dict], list[dict]]:
    """Times the matching cost and the box losses on every batch size; returns the records and no skip notes."""
    env = environment()
    repeat = repeat or (5 if quick or device == "cpu" else 20)
    records = []
    variants = {"e2evlp-1-thread": single_threaded} if device == "cpu" else {}
    for B in cases(device, quick):
        records += _time_batch(B, device, repeat, env, variants)
    if device == "cpu":
        with busy_cores() as busy:
            records += _time_batch(max(cases(device, quick)), device, repeat, env, variants, suffix=f" busy={busy}")
    return records, []


def _time_batch(B: int, device: str, repeat: int, env: dict, variants: dict, suffix: str = "") -> list[dict]:
    """Checks and times the matching cost and the box losses on one batch size. `variants` maps an extra
    implementation's name to a wrapper of e2evlp's (single_threaded)."""
    records = []

    def record(case: str, pass_: str, fns: dict) -> None:
        for name, wrap in variants.items():
            fns[name] = wrap(fns["e2evlp"])
        timing = time_interleaved(fns, device, repeat=repeat)
        records.extend(make_record(BENCH, name, case + suffix, t, device=device, dtype="float32", pass_=pass_,
                                   env=env) for name, t in timing.items())

    batch = make_batch(B, device)
    shape = f"B={B} Q={QUERIES} C={CLASSES} T~U[0,{MAX_TARGETS}]"
    check_costs(batch)
    with torch.no_grad():
        record(f"{shape} matching_cost", "fwd", cost_impls(batch))
    pred, target = matched_pairs(batch)
    check_losses(pred, target)
    pairs = f"{shape} box_losses P={len(target)}"
    record(pairs, "fwd", {name: (lambda f=f: f(pred, target)) for name, f in LOSSES.items()})
    record(pairs, "fwd+bwd", {name: (lambda f=f: loss_and_grad(f, pred, target)) for name, f in LOSSES.items()})
    return records


if __name__ == "__main__":
    sys.exit(cli.main(["bench", "boxes", *sys.argv[1:]]))
