"""Our BLEU / CIDEr-D and detection AP against the official tools (pycocoevalcap, pycocotools' COCOeval).

The fixed cases carry the official tools' own outputs (computed with pycocoevalcap 1.2 and pycocotools
2.0.11); when those packages are installed (`pip install -e .[eval]`) the tests also run them live."""

import contextlib
import io

import pytest
import torch

from e2evlp.eval import bleu, cider, detection_ap, tokenize_caption

REFERENCES = {
    1: ["a small red triangle above a large yellow triangle", "three shapes: two triangles and a circle",
        "there is a red triangle, a yellow triangle and a red circle"],
    2: ["a picture of a green circle", "there is a green circle", "a large green circle on a plain background"],
    3: ["a picture of a blue circle and a blue triangle", "there is a blue circle and a blue triangle",
        "a small blue triangle right of a small blue circle"],
    4: ["A man riding a horse on the beach.", "Someone rides a brown horse near the sea",
        "a person on horseback at the shore"],
}
HYPOTHESES = {1: "a picture of a red triangle, a yellow triangle and a red triangle",
              2: "a picture of a green square and a green square",
              3: "a small blue triangle left of a small blue triangle", 4: "a man rides a horse on the beach"}
PYCOCOEVALCAP_BLEU = [0.7317073170553243, 0.6889273999496877, 0.6253079722915439, 0.5639833544727221]
PYCOCOEVALCAP_CIDER = 2.6000776665409315
COCOEVAL_AP, COCOEVAL_AP50 = 0.057872072921577866, 0.24846308160227787


def test_caption_metrics_equal_pycocoevalcap_on_a_fixed_case():
    # pycocoevalcap adds 1e-9 / 1e-15 guards inside BLEU's ratios: equal to ~1e-10.
    assert bleu(REFERENCES, HYPOTHESES) == pytest.approx(PYCOCOEVALCAP_BLEU, abs=1e-9)
    assert cider(REFERENCES, HYPOTHESES) == pytest.approx(PYCOCOEVALCAP_CIDER, abs=1e-12)


def test_caption_metrics_equal_pycocoevalcap_live():
    bleu_module = pytest.importorskip("pycocoevalcap.bleu.bleu")
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")

    def tokenized(texts):  # pycocoevalcap scores space-joined tokens (its PTB tokenizer needs Java)
        return {k: [" ".join(tokenize_caption(t)) for t in (v if isinstance(v, list) else [v])]
                for k, v in texts.items()}

    refs, hyps = tokenized(REFERENCES), tokenized(HYPOTHESES)
    assert bleu(REFERENCES, HYPOTHESES) == pytest.approx(bleu_module.Bleu(4).compute_score(refs, hyps, verbose=0)[0],
                                                         abs=1e-9)
    assert cider(REFERENCES, HYPOTHESES) == pytest.approx(cider_module.Cider().compute_score(refs, hyps)[0],
                                                          abs=1e-12)


def _detection_case():
    """12 images, 1-4 boxes each (3 classes) and 2-6 noisy, partly mislabelled detections per image."""
    g = torch.Generator().manual_seed(0)
    predictions, targets = [], []
    for _ in range(12):
        n = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 60
        wh = torch.rand(n, 2, generator=g) * 30 + 5
        labels = torch.randint(0, 3, (n,), generator=g)
        m = min(6, 2 * n)
        pred_xy = xy.repeat(2, 1)[:m] + torch.randn(m, 2, generator=g) * 4
        pred_wh = (wh.repeat(2, 1)[:m] * (1 + 0.2 * torch.randn(m, 2, generator=g))).abs() + 1
        keep = torch.rand(m, generator=g) < 0.8
        pred_labels = torch.where(keep, labels.repeat(2)[:m], torch.randint(0, 3, (m,), generator=g))
        predictions.append({"boxes": torch.cat([pred_xy, pred_xy + pred_wh], 1), "labels": pred_labels,
                            "scores": torch.rand(m, generator=g)})
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": labels})
    return predictions, targets


def test_detection_ap_equals_cocoeval_on_a_fixed_case():
    ap = detection_ap(*_detection_case())
    assert ap["ap"] == pytest.approx(COCOEVAL_AP, abs=1e-6) and ap["ap50"] == pytest.approx(COCOEVAL_AP50, abs=1e-6)


def test_detection_ap_equals_cocoeval_live():
    coco_module = pytest.importorskip("pycocotools.coco")
    cocoeval_module = pytest.importorskip("pycocotools.cocoeval")
    predictions, targets = _detection_case()
    images, annotations, detections = [], [], []
    for image_id, (pred, target) in enumerate(zip(predictions, targets), start=1):
        images.append({"id": image_id, "width": 100, "height": 100})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        for box, label, score in zip(pred["boxes"].tolist(), pred["labels"].tolist(), pred["scores"].tolist()):
            detections.append({"image_id": image_id, "category_id": label + 1, "score": score,
                               "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    ground_truth = coco_module.COCO()
    ground_truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in (1, 2, 3)]}
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        evaluation = cocoeval_module.COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ap = detection_ap(predictions, targets)
    assert ap["ap"] == pytest.approx(evaluation.stats[0], abs=1e-6)
    assert ap["ap50"] == pytest.approx(evaluation.stats[1], abs=1e-6)
