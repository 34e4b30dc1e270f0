"""The demo's picture: held-out images with the model's detected boxes (class, colour, score) and generated captions."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from e2evlp.data.collate import pad_images
from e2evlp.data.readers import load_image
from e2evlp.eval.evaluate import detections_from_outputs
from e2evlp.io import atomic_write
from e2evlp.train.recipes import captioner_of, image_transforms, pretraining_records

SCALE = 3
CAPTION_HEIGHT = 40
BOX_COLOUR = (20, 20, 20)
GAP = 12


@torch.no_grad()
def draw_predictions(model, config: dict, tokenizer, summary: dict, path: str | Path, *, num_images: int = 4,
                     min_score: float = 0.5) -> Path:
    """Draws the first `num_images` validation images with boxes scoring ≥ `min_score` and greedy captions."""
    model.eval()
    device = next(model.parameters()).device
    captions, detections = pretraining_records(config["data"], "val")
    records = captions[:num_images]
    transforms = image_transforms(config, train=False)
    images = [transforms({"image": load_image(r.image_path), "boxes": torch.zeros(0, 4)})["image"] for r in records]
    padded = pad_images(images, size_divisibility=model.config.backbone_stride)
    pixel_values, pixel_mask = (t.to(device) for t in padded)
    # Detection reads the image with its first reference caption, as in evaluation.
    encoded = tokenizer([r.captions[0] for r in records], padding="longest", return_tensors="pt").to(device)
    joint = model.model.encode(encoded["input_ids"], encoded["attention_mask"], pixel_values, pixel_mask)
    outputs = model.model.detect(joint)
    found = detections_from_outputs(outputs)
    attributes = outputs["pred_attributes"].argmax(-1).cpu()  # [B, Q]
    generated = captioner_of(model).generate(pixel_values, pixel_mask)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated.tolist()]
    tiles = [_tile(r, f, a, t, summary, min_score) for r, f, a, t in zip(records, found, attributes, texts)]
    width, height = tiles[0].size
    sheet = Image.new("RGB", (width * len(tiles) + GAP * (len(tiles) + 1), height + 2 * GAP), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (GAP + i * (width + GAP), GAP))
    path = Path(path)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path


def _tile(record, found: dict, attributes: torch.Tensor, caption: str, summary: dict, min_score: float):
    image = load_image(record.image_path)
    image = image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)
    tile = Image.new("RGB", (image.width, image.height + CAPTION_HEIGHT), "white")
    tile.paste(image, (0, 0))
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default()
    keep = (found["scores"] >= min_score).nonzero().flatten().tolist()
    for q in keep:
        x0, y0, x1, y1 = (found["boxes"][q].clamp(0, 1) * torch.tensor([image.width, image.height] * 2)).tolist()
        draw.rectangle([x0, y0, x1, y1], outline=BOX_COLOUR, width=2)
        label = f"{summary['attributes'][attributes[q]]} {summary['classes'][found['labels'][q]]} " \
                f"{found['scores'][q]:.2f}"
        draw.text((x0 + 3, y0 + 2), label, fill=BOX_COLOUR, font=font)
    words = caption.split()
    lines = [" ".join(words[: (len(words) + 1) // 2]), " ".join(words[(len(words) + 1) // 2:])]
    for i, line in enumerate(lines):
        draw.text((4, image.height + 4 + 16 * i), line, fill=(0, 0, 0), font=font)
    return tile
