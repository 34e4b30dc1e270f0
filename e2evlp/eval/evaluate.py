"""Evaluation loops: run a model over a data loader's batches and score it with the metrics of e2evlp.eval."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from e2evlp.devices import batch_to_device
from e2evlp.eval.caption_metrics import bleu, cider
from e2evlp.eval.detection_metrics import detection_ap
from e2evlp.eval.metrics import classification_accuracy, recall_at_k, vqa_accuracy
from e2evlp.ops.boxes import box_cxcywh_to_xyxy


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _inputs(batch: dict, *names: str) -> dict:
    return {name: batch[name] for name in names if name in batch}


def detections_from_outputs(outputs: dict) -> list[dict[str, torch.Tensor]]:
    """DETR's post-processing: per image, every query's best real class, its probability and its box
    (normalized xyxy). The no-object class only lowers the score, so AP sees every query ranked."""
    probs = outputs["pred_logits"].float().softmax(-1)[..., :-1]  # [B, Q, C]
    scores, labels = probs.max(-1)  # [B, Q]
    boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"].float())  # [B, Q, 4]
    return [{"boxes": b, "scores": s, "labels": label} for b, s, label in zip(boxes, scores, labels)]


@torch.no_grad()
def evaluate_pretraining(model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """ITM accuracy and detection AP / AP50 of an E2EVLPForPretraining.

    Batches come from a PretrainingCollator with ``mlm_probability=0`` (text left intact): ITM is scored
    against ``itm_labels`` on every pair; detection is scored on the matched pairs only (image with its own
    caption, the input the detection task trains on)."""
    model.eval()
    device = _device_of(model)
    itm_pred, itm_true, predictions, targets = [], [], [], []
    for batch in batches:
        batch = batch_to_device(batch, device)
        joint = model.model.encode(**_inputs(batch, "input_ids", "attention_mask", "pixel_values", "pixel_mask"))
        logits = model.itm_head(model.model.pooler(joint.hidden))  # [B, 2]
        itm_pred.append(logits.argmax(-1).cpu())
        itm_true.append(batch["itm_labels"].cpu())
        matched = batch["itm_labels"].bool().tolist()
        detections = detections_from_outputs(model.model.detect(joint))
        for keep, detection, target in zip(matched, detections, batch["targets"]):
            if keep and len(target["labels"]):
                predictions.append(detection)
                targets.append({"boxes": box_cxcywh_to_xyxy(target["boxes"].float()), "labels": target["labels"]})
    labels = torch.cat(itm_true)
    correct = torch.cat(itm_pred) == labels
    # The mean of the per-class accuracies: a head that always answers "match" scores 0.5, not the match rate.
    itm_acc = 0.5 * (correct[labels == 1].float().mean() + correct[labels == 0].float().mean()).item()
    result = {"itm_acc": itm_acc}
    if targets:
        ap = detection_ap(predictions, targets)
        result |= {"det_ap": ap["ap"], "det_ap50": ap["ap50"]}
    return result


@torch.no_grad()
def generate_captions(model: nn.Module, batches: Iterable[dict], tokenizer, *, num_beams: int = 1,
                      max_length: int | None = None) -> tuple[dict, dict]:
    """Captions of an E2EVLPForCaptioning for CaptionCollator batches → ({image_id: caption}, {image_id: refs})."""
    model.eval()
    device = _device_of(model)
    hypotheses, references = {}, {}
    for batch in batches:
        ids = model.generate(batch["pixel_values"].to(device), batch["pixel_mask"].to(device), num_beams=num_beams,
                             max_length=max_length)
        for image_id, tokens, refs in zip(batch["image_ids"], ids.tolist(), batch["references"]):
            hypotheses[image_id] = tokenizer.decode(tokens, skip_special_tokens=True)
            references[image_id] = list(refs)
    return hypotheses, references


def caption_scores(hypotheses: dict, references: dict) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D of generated captions against their references."""
    scores = {f"bleu{n}": value for n, value in enumerate(bleu(references, hypotheses), start=1)}
    scores["cider"] = cider(references, hypotheses)
    return scores


@torch.no_grad()
def evaluate_vqa(model: nn.Module, batches: Iterable[dict], answer_vocab: Sequence[str]) -> dict:
    """VQA accuracy (the official min(1, matches/3) formula over the raw answers) of an E2EVLPForVQA's top
    answer; also returns the predictions {question_id: answer}."""
    model.eval()
    device = _device_of(model)
    predictions, annotations = {}, {}
    for batch in batches:
        inputs = batch_to_device(_inputs(batch, "pixel_values", "pixel_mask", "input_ids", "attention_mask"), device)
        best = model(**inputs).logits.argmax(-1).tolist()  # [B]
        for question_id, answer_index, answers in zip(batch["question_ids"], best, batch["answers"]):
            if answers is None:
                raise ValueError(f"question {question_id} has no answers: VQA accuracy needs annotated questions")
            predictions[question_id] = answer_vocab[answer_index]
            annotations[question_id] = answers
    return {"vqa_acc": vqa_accuracy(predictions, annotations), "predictions": predictions}


@torch.no_grad()
def evaluate_nlvr2(model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """NLVR2 accuracy of an E2EVLPForNLVR2 on labelled pairs."""
    model.eval()
    device = _device_of(model)
    predictions, labels = [], []
    for batch in batches:
        inputs = batch_to_device(_inputs(batch, "pixel_values", "pixel_mask", "input_ids", "attention_mask"), device)
        predictions.append(model(**inputs).logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    return {"nlvr2_acc": classification_accuracy(torch.cat(predictions), torch.cat(labels))}


@torch.no_grad()
def evaluate_retrieval(model: nn.Module, batches: Iterable[dict], tokenizer, *,
                       batch_size: int = 64) -> dict[str, float]:
    """Recall@1/5/10 in both directions of an E2EVLPForRetrieval over every (text, image) pair of the set.

    Batches carry images with all of their ``references`` (a CaptionCollator over a per-image CaptionDataset);
    every reference, encoded with `tokenizer`, becomes a query text. Each image goes through the backbone
    once (``embed_gallery``, its tokens kept on the CPU), then every pair through the encoder and the ITM
    head."""
    model.eval()
    device = _device_of(model)
    gallery, texts, text_to_image = [], [], []
    for batch in batches:
        for index, refs in enumerate(batch["references"]):
            text_to_image += [len(gallery) + index] * len(refs)
            texts += list(refs)
        gallery += model.embed_gallery(batch["pixel_values"].to(device), batch["pixel_mask"].to(device), device="cpu")
    if not gallery:
        raise ValueError("evaluate_retrieval got no images")
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=model.config.max_text_length,
                        return_tensors="pt")
    scores = model.score_gallery(gallery, encoded["input_ids"].to(device), encoded["attention_mask"].to(device),
                                 batch_size=batch_size)  # [T, N]
    return recall_at_k(scores.cpu(), text_to_image)
