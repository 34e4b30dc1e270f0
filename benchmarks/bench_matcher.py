"""DETR set matching and criterion: e2evlp vs DETR's formulation and vs per-image cost blocks (PyTorch + scipy).

Cases: B images, Q queries, C = 91 classes, T ~ U[0, 50] targets per image. Two comparisons:
  * "L=1 matcher": the matcher alone on one decoder layer;
  * "L=6 criterion": matcher + SetCriterion (labels, boxes, cardinality) on 6 decoder layers
    (5 aux_outputs), forward + backward.
Each implementation's answer is checked against DETR's before timing (same total matching cost,
same losses).

    python -m benchmarks.bench_matcher [e2evlp bench options]   (the same as: e2evlp bench matcher ...)
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from benchmarks.common import environment, make_record, time_interleaved
from e2evlp import cli, reference
from e2evlp import nn as enn

BENCH = "matcher"
BASELINE = "detr"  # the column the Markdown table's speed-ups are relative to
WEIGHTS = dict(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
LAYER_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
# As DETR builds it: the same weights for every auxiliary layer's suffixed losses.
WEIGHT_DICT = LAYER_WEIGHTS | {f"{k}_{i}": w for i in range(5) for k, w in LAYER_WEIGHTS.items()}
LOSSES = ["labels", "boxes", "cardinality"]
CLASSES = 91


def make_batch(B: int, Q: int, layers: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def layer():
        centers = torch.rand(B, Q, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(B, Q, 2, generator=g) * 0.3 + 0.05
        return {"pred_logits": torch.randn(B, Q, CLASSES + 1, generator=g).to(device).requires_grad_(),
                "pred_boxes": torch.cat([centers, sizes], -1).to(device).requires_grad_()}

    outputs = layer()
    outputs["aux_outputs"] = [layer() for _ in range(layers - 1)]
    targets = []
    for n in torch.randint(0, 51, (B,), generator=g).tolist():
        boxes = torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1)
        targets.append({"labels": torch.randint(0, CLASSES, (n,), generator=g).to(device), "boxes": boxes.to(device)})
    return outputs, targets


def leaves(outputs):
    return [layer[k] for layer in [outputs] + outputs["aux_outputs"] for k in ("pred_logits", "pred_boxes")]


def matchers():
    return {"e2evlp": enn.HungarianMatcher(**WEIGHTS), "detr": reference.HungarianMatcher(**WEIGHTS),
            "detr-blocks": reference.HungarianMatcher(**WEIGHTS, per_image_blocks=True)}


def criteria(device):
    built = {"e2evlp": enn.SetCriterion(CLASSES, enn.HungarianMatcher(**WEIGHTS), WEIGHT_DICT, 0.1, LOSSES)}
    for name, matcher in (("detr", reference.HungarianMatcher(**WEIGHTS)),
                          ("detr-blocks", reference.HungarianMatcher(**WEIGHTS, per_image_blocks=True))):
        built[name] = reference.SetCriterion(CLASSES, matcher, WEIGHT_DICT, 0.1, LOSSES)
    return {name: c.to(device) for name, c in built.items()}


def check_matchers(found, outputs, targets):
    main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
    totals = {}
    for name, matcher in found.items():
        pairs = matcher(main, targets)
        total = 0.0
        for b, (t, (i, j)) in enumerate(zip(targets, pairs)):
            block = reference.cost_block(main["pred_logits"][b].double(), main["pred_boxes"][b].double(), t["labels"],
                                         t["boxes"].double(), w_class=1.0, w_bbox=5.0, w_giou=2.0)
            total += block[i.to(block.device), j.to(block.device)].sum().item()
        totals[name] = total
    for name, total in totals.items():
        if not np.isclose(total, totals["detr"], rtol=1e-6):
            raise AssertionError(f"{name}'s matching costs {total}, DETR's {totals['detr']}")


def check_criteria(found, outputs, targets):
    want = found["detr"](outputs, targets)
    for name, criterion in found.items():
        got = criterion(outputs, targets)
        for key in want:
            if not torch.allclose(torch.as_tensor(got[key]).float().cpu(), torch.as_tensor(want[key]).float().cpu(),
                                  rtol=1e-4, atol=1e-4):
                raise AssertionError(f"{name}: {key} = {got[key]} but DETR gives {want[key]}")


def cases(device: str, quick: bool) -> list[tuple[int, int]]:
    """(B, Q) per case: two batch sizes even when quick, so the plot has a line to draw."""
    if not quick:
        return [(8, 100), (64, 100), (8, 300), (64, 300)]
    return [(8, 100), (64, 100)] if device == "cuda" else [(2, 100), (8, 100)]


def run(device: str, quick: bool, repeat: int | None = None) -> tuple[list[dict], list[dict]]:
    """Times the matcher alone and matcher + criterion on every case; returns the records and no skip notes."""
    env = environment()
    repeat = repeat or (3 if device == "cpu" else 10)
    records = []
    for B, Q in cases(device, quick):
        outputs, targets = make_batch(B, Q, 6, device)
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        found = matchers()
        check_matchers(found, outputs, targets)
        timing = time_interleaved({name: (lambda m=m: m(main, targets)) for name, m in found.items()}, device,
                                  warmup=1, repeat=repeat)
        case = f"B={B} Q={Q} C={CLASSES} T~U[0,50] L=1 matcher"
        records += [make_record(BENCH, name, case, t, device=device, dtype="float32", pass_="fwd", env=env)
                    for name, t in timing.items()]

        found = criteria(device)
        check_criteria(found, outputs, targets)
        params = leaves(outputs)

        def step(criterion):
            losses = criterion(outputs, targets)
            total = sum(losses[k] * w for k, w in WEIGHT_DICT.items())
            torch.autograd.grad(total, params)

        timing = time_interleaved({name: (lambda c=c: step(c)) for name, c in found.items()}, device, warmup=1,
                                  repeat=repeat)
        case = f"B={B} Q={Q} C={CLASSES} T~U[0,50] L=6 criterion"
        records += [make_record(BENCH, name, case, t, device=device, dtype="float32", pass_="fwd+bwd", env=env)
                    for name, t in timing.items()]
    return records, []


if __name__ == "__main__":
    sys.exit(cli.main(["bench", "matcher", *sys.argv[1:]]))
