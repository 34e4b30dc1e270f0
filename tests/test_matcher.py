"""HungarianMatcher and SetCriterion against DETR's formulation (e2evlp.reference), values and gradients."""

import numpy as np
import pytest
import torch

from e2evlp import nn as enn
from e2evlp import reference
from tests.box_helpers import detr_batch
from tests.helpers import gen

WEIGHTS = dict(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
SIZES = {
    "mixed": [3, 0, 7, 1],
    "one target": [1],
    "no targets": [0, 0],
    "more targets than queries": [12, 3],
}


def total_cost(outputs, targets, pairs, class_cost="softmax"):
    """Each image's total of DETR's cost (float64) over the given (index_i, index_j) pairs."""
    totals = []
    for b, (t, (i, j)) in enumerate(zip(targets, pairs)):
        block = reference.cost_block(outputs["pred_logits"][b].double(), outputs["pred_boxes"][b].double(),
                                     t["labels"], t["boxes"].double(), w_class=WEIGHTS["cost_class"],
                                     w_bbox=WEIGHTS["cost_bbox"], w_giou=WEIGHTS["cost_giou"], class_cost=class_cost)
        totals.append(block[i.cpu(), j.cpu()].sum().item())
    return np.array(totals)


@pytest.mark.parametrize("case", list(SIZES))
@pytest.mark.parametrize("class_cost", ["softmax", "focal"])
def test_matcher_total_cost_equals_detr(case, class_cost):
    outputs, targets = detr_batch(SIZES[case], queries=10, classes=6, generator=gen(len(case)))
    if class_cost == "focal":
        outputs["pred_logits"] = outputs["pred_logits"][..., :-1]
    ours = enn.HungarianMatcher(**WEIGHTS, class_cost=class_cost)(outputs, targets)
    detr = reference.HungarianMatcher(**WEIGHTS, class_cost=class_cost)(outputs, targets)
    for (i, j), (ri, _), n in zip(ours, detr, SIZES[case]):
        assert i.dtype == j.dtype == torch.int64
        assert len(i) == len(j) == len(ri) == min(10, n)
        assert torch.all(i[1:] > i[:-1]), "index_i must ascend"
        assert len(set(j.tolist())) == len(j)
    np.testing.assert_allclose(total_cost(outputs, targets, ours, class_cost),
                               total_cost(outputs, targets, detr, class_cost), rtol=1e-6, atol=1e-6)


def test_matcher_with_duplicated_gt_boxes():
    outputs, targets = detr_batch([4, 5], queries=8, classes=3, generator=gen(1))
    for t in targets:
        t["boxes"][1:] = t["boxes"][0]
        t["labels"][1:] = t["labels"][0]
    ours = enn.HungarianMatcher(**WEIGHTS)(outputs, targets)
    detr = reference.HungarianMatcher(**WEIGHTS)(outputs, targets)
    np.testing.assert_allclose(total_cost(outputs, targets, ours), total_cost(outputs, targets, detr), rtol=1e-6)


def test_match_layers_equals_one_layer_at_a_time():
    outputs, targets = detr_batch([3, 5, 0], queries=9, classes=4, generator=gen(2), layers=4)
    matcher = enn.HungarianMatcher(**WEIGHTS)
    layers = [outputs] + outputs["aux_outputs"]
    together, status = matcher.match_layers(layers, targets)
    assert len(together) == 4 and status.shape == (4, 3) and not status.any()
    for layer, matching in zip(layers, together):
        for (i, j), (ri, rj) in zip(matching.pairs(), matcher(layer, targets)):
            assert torch.equal(i, ri) and torch.equal(j, rj)
        assert matching.valid.sum(1).tolist() == [3, 5, 0]
        assert matching.src_idx.shape == (3, 5)  # K = min(Q, T)


def test_matching_slots_agree_with_the_assignment():
    outputs, targets = detr_batch([2, 12, 0, 5], queries=10, classes=4, generator=gen(12))
    (matching,), _ = enn.HungarianMatcher(**WEIGHTS).match_layers([outputs], targets)
    assert matching.query_target.shape == (4, 10)
    for b, n in enumerate([2, 12, 0, 5]):
        k = min(n, 10)
        src, tgt = matching.src_idx[b, :k], matching.tgt_idx[b, :k]
        assert matching.valid[b].tolist() == [True] * k + [False] * (matching.valid.shape[1] - k)
        assert torch.equal(matching.query_target[b, src], tgt)
        assert int((matching.query_target[b] >= 0).sum()) == k


def test_refused_problems_come_back_as_status_without_a_host_read():
    outputs, targets = detr_batch([2, 3], queries=4, classes=3, generator=gen(13), layers=2)
    outputs["aux_outputs"][0]["pred_logits"][1, 0, 0] = float("nan")
    layers = [outputs] + outputs["aux_outputs"]
    matchings, status = enn.HungarianMatcher(**WEIGHTS).match_layers(layers, targets)
    assert status.tolist() == [[0, 0], [0, 1]]
    assert not matchings[1].valid[1].any() and matchings[1].valid[0].sum() == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_matcher_dtypes(dtype):
    outputs, targets = detr_batch([4, 2], queries=6, classes=3, generator=gen(3))
    cast = {k: v.to(dtype) for k, v in outputs.items()}
    ours = enn.HungarianMatcher(**WEIGHTS)(cast, targets)
    detr = reference.HungarianMatcher(**WEIGHTS)({k: v.float() for k, v in cast.items()}, targets)
    promoted = {k: v.float() for k, v in cast.items()}
    np.testing.assert_allclose(total_cost(promoted, targets, ours), total_cost(promoted, targets, detr), rtol=1e-5)


def test_matcher_errors():
    outputs, targets = detr_batch([2, 3], queries=4, classes=3, generator=gen(4))
    matcher = enn.HungarianMatcher(**WEIGHTS)
    with pytest.raises(ValueError, match="got 1 target dicts for a batch of 2"):
        matcher(outputs, targets[:1])
    bad = dict(outputs)
    bad["pred_logits"] = outputs["pred_logits"].clone()
    bad["pred_logits"][1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="pred_logits of decoder layer 0 contains NaN"):
        matcher(bad, targets)
    targets[1]["labels"][0] = 7
    with pytest.raises(ValueError, match=r"target label is outside \[0, 4\)"):
        matcher(outputs, targets)
    with pytest.raises(ValueError, match="can't all be 0"):
        enn.HungarianMatcher(0, 0, 0)
    with pytest.raises(KeyError, match="pred_boxes"):
        matcher({"pred_logits": outputs["pred_logits"]}, targets)


LOSSES = ["labels", "boxes", "cardinality", "attributes"]


def make_criteria(num_classes, num_attributes, matcher=None):
    weight_dict = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2, "loss_attr": 0.5}
    ours = enn.SetCriterion(num_classes, matcher or enn.HungarianMatcher(**WEIGHTS), weight_dict, 0.1, LOSSES,
                            num_attributes=num_attributes)
    detr = reference.SetCriterion(num_classes, reference.HungarianMatcher(**WEIGHTS), weight_dict, 0.1, LOSSES,
                                  num_attributes=num_attributes)
    return ours, detr


def require_grad(outputs):
    leaves = []
    for layer in [outputs] + outputs.get("aux_outputs", []):
        for key, value in layer.items():
            if key != "aux_outputs":
                layer[key] = value.detach().requires_grad_()
                leaves.append(layer[key])
    return leaves


@pytest.mark.parametrize("case", list(SIZES))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_criterion_equals_detr(case, dtype, tol):
    outputs, targets = detr_batch(SIZES[case], queries=10, classes=5, generator=gen(5), dtype=dtype, layers=3,
                                  attributes=4)
    leaves = require_grad(outputs)
    ours, detr = make_criteria(5, 4)
    got, want = ours(outputs, targets), detr.to(dtype)(outputs, targets)
    assert got.pop("matching_failures").item() == 0
    assert set(got) == set(want)
    assert {"loss_ce", "loss_bbox", "loss_giou", "cardinality_error", "class_error", "loss_attr", "loss_ce_1",
            "loss_attr_0", "loss_giou_1"} <= set(got)
    for key in want:
        torch.testing.assert_close(got[key], torch.as_tensor(want[key], dtype=got[key].dtype), rtol=tol, atol=tol,
                                   msg=key)
    grads = torch.autograd.grad(ours.weighted_total(got), leaves, allow_unused=True)
    ref = torch.autograd.grad(ours.weighted_total(want), leaves, allow_unused=True)
    for g, r in zip(grads, ref):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r, rtol=tol, atol=tol)


def test_criterion_accepts_detr_matcher():
    outputs, targets = detr_batch([3, 4], queries=7, classes=5, generator=gen(6), layers=2, attributes=3)
    ours, detr = make_criteria(5, 3, matcher=reference.HungarianMatcher(**WEIGHTS))
    got, want = ours(outputs, targets), detr(outputs, targets)
    for key in want:
        torch.testing.assert_close(got[key], torch.as_tensor(want[key], dtype=got[key].dtype), rtol=1e-5, atol=1e-5)


def test_criterion_empty_batch_losses_are_finite():
    outputs, targets = detr_batch([0, 0], queries=5, classes=3, generator=gen(7), attributes=2)
    ours, _ = make_criteria(3, 2)
    losses = ours(outputs, targets)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert losses["class_error"].item() == 100.0 and losses["loss_bbox"].item() == 0.0


def test_criterion_errors():
    with pytest.raises(ValueError, match="needs num_attributes"):
        enn.SetCriterion(3, enn.HungarianMatcher(), {}, 0.1, ["attributes"])
    with pytest.raises(ValueError, match="unknown losses"):
        enn.SetCriterion(3, enn.HungarianMatcher(), {}, 0.1, ["masks"])
    outputs, targets = detr_batch([2], queries=4, classes=3, generator=gen(8), attributes=2)
    del targets[0]["attributes"]
    criterion = enn.SetCriterion(3, enn.HungarianMatcher(), {}, 0.1, ["attributes"], num_attributes=2)
    with pytest.raises(KeyError, match="'attributes' entry"):
        criterion(outputs, targets)


@pytest.mark.parametrize("coordinate, value, match", [
    (2, -0.1, r"targets\[1\]\['boxes'\] has invalid cxcywh boxes \(a negative width or height\)"),
    (3, -1e-3, r"targets\[1\]\['boxes'\] has invalid cxcywh boxes \(a negative width or height\)"),
    (0, float("nan"), r"targets\[1\]\['boxes'\] contains NaN"),
])
def test_criterion_rejects_invalid_target_boxes_on_cpu(coordinate, value, match):
    outputs, targets = detr_batch([2, 3], queries=5, classes=3, generator=gen(10), attributes=2)
    criterion, _ = make_criteria(3, 2)
    targets[1]["boxes"][1, 2:] = 0.0  # zero width and height are valid
    assert all(torch.isfinite(v).all() for v in criterion(outputs, targets).values())
    targets[1]["boxes"][2, coordinate] = value
    with pytest.raises(ValueError, match=match):
        criterion(outputs, targets)


def test_drop_in_training_loop_gives_detr_losses():
    """Three SGD steps of a small DETR-style head with each criterion: the losses stay equal."""
    torch.manual_seed(0)
    features = torch.randn(2, 6, 16)
    _, targets = detr_batch([3, 2], queries=6, classes=4, generator=gen(9), attributes=3)
    heads = {}
    for name in ("ours", "detr"):
        torch.manual_seed(1)
        heads[name] = torch.nn.ModuleDict({"cls": torch.nn.Linear(16, 5), "box": torch.nn.Linear(16, 4),
                                           "attr": torch.nn.Linear(16, 3)})
    ours, detr = make_criteria(4, 3)
    criteria = {"ours": ours, "detr": detr}
    optimizers = {name: torch.optim.SGD(head.parameters(), lr=0.1) for name, head in heads.items()}
    for _ in range(3):
        totals = {}
        for name, head in heads.items():
            outputs = {"pred_logits": head["cls"](features), "pred_boxes": head["box"](features).sigmoid(),
                       "pred_attributes": head["attr"](features)}
            losses = criteria[name](outputs, targets)
            total = ours.weighted_total(losses)
            optimizers[name].zero_grad()
            total.backward()
            optimizers[name].step()
            totals[name] = total.item()
        assert totals["ours"] == pytest.approx(totals["detr"], rel=1e-5)
