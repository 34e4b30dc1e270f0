"""One E2E-VLP pre-training step (forward + backward + AdamW): fused kernels vs the plain reference, side by side.

On a GPU: the ``base`` preset (ResNet-50, BERT-base encoder, 6-layer decoder, 100 queries), batch 32,
images resized DETR-style into a 512×672 canvas with per-image padding, 20–40 text tokens, all four
tasks, bf16 autocast (--quick: batch 8). On the CPU: the ``tiny`` preset at batch 4 (the step runs and is reported).
Implementations: "e2evlp" (kernels="fused", the encoder packed to its real tokens), "e2evlp-padded"
(kernels="fused", unpad_encoder=False: the padded layout with key padding masks) and "reference"
(kernels="reference", padded: plain PyTorch attention, DETR's matcher and criterion), and the padded layout
under torch.compile (fullgraph, Inductor): "e2evlp-compiled", and on a GPU "e2evlp-compiled-graphs" (the
compiled forward and backward replayed as CUDA graphs); those take the targets as PaddedTargets, as the
collator's static_shapes gives them, and report their compile time (the first step) as compile_s. All start
from the same weights and see the same batch. Reported per implementation: ms per step, samples/s, tokens/s (the
real text + image tokens of the encoder, padding excluded), peak memory and MFU, with FLOPs estimated as
6 × (non-embedding Transformer parameters) × real encoder tokens + the backbone's forward FLOPs × 3
(counted with torch.utils.flop_counter on one forward). Padding is not counted, so skipping it shows up
as a shorter step, not as extra FLOPs.

    python -m benchmarks.bench_train_step [e2evlp bench options]   (the same as: e2evlp bench train-step ...)
"""

from __future__ import annotations

import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import environment, make_record, time_interleaved
from e2evlp import cli
from e2evlp.models import E2EVLPConfig, E2EVLPForPretraining
from e2evlp.nn import pad_targets
from e2evlp.train.trainer import compile_model

BENCH = "train_step"
BASELINE = "reference"  # the column the Markdown table's speed-ups are relative to
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, by datasheet


def make_batch(config: E2EVLPConfig, B: int, H: int, W: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    pixel_mask = torch.zeros(B, H, W, dtype=torch.bool)
    for b in range(B):  # DETR-style resizing leaves each image its own real extent in the canvas
        h = int(H * (0.75 + 0.25 * torch.rand((), generator=g)))
        w = int(W * (0.75 + 0.25 * torch.rand((), generator=g)))
        pixel_mask[b, :h, :w] = True
    text_len = min(40, config.max_text_length)
    input_ids = torch.randint(1000, 2000, (B, text_len), generator=g)
    attention_mask = (torch.arange(text_len)[None] < torch.randint(text_len // 2, text_len + 1, (B, 1),
                                                                      generator=g)).long()
    mlm_labels = torch.where(torch.rand(B, text_len, generator=g) < 0.15, input_ids, torch.full_like(input_ids, -100))
    targets = []
    for n in torch.randint(0, 30, (B,), generator=g).tolist():
        boxes = torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1)
        targets.append({"labels": torch.randint(0, config.num_classes, (n,), generator=g).to(device),
                        "boxes": boxes.to(device),
                        "attributes": torch.randint(-1, config.num_attributes, (n,), generator=g).to(device)})
    caption_ids = torch.randint(1000, 2000, (B, text_len), generator=g)
    return dict(pixel_values=torch.randn(B, 3, H, W, generator=g).to(device), pixel_mask=pixel_mask.to(device),
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                mlm_labels=mlm_labels.to(device), itm_labels=torch.randint(0, 2, (B,), generator=g).to(device),
                targets=targets, caption_ids=caption_ids.to(device), caption_mask=attention_mask.to(device))


def step_flops(model: E2EVLPForPretraining, batch: dict) -> tuple[float, int]:
    """(training FLOPs of one step, real encoder tokens): 6·N·tokens for the Transformer, 3× the counted
    backbone forward."""
    transformer = sum(p.numel() for name, p in model.named_parameters()
                      if not name.startswith(("model.backbone", "model.embeddings")))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        visual = model.model.backbone(batch["pixel_values"], batch["pixel_mask"])
    tokens = int(batch["attention_mask"].sum()) + int((~visual.padding_mask).sum())
    return 6.0 * transformer * tokens + 3.0 * counter.get_total_flops(), tokens


def shape(device: str, quick: bool) -> tuple[str, int, int, int]:
    """(preset, batch, canvas height, width); the quick GPU step keeps the paper's model at a quarter of the batch."""
    if device != "cuda":
        return "tiny", 4, 64, 96
    return ("base", 8, 512, 672) if quick else ("base", 32, 512, 672)


def run(device: str, quick: bool, repeat: int | None = None) -> tuple[list[dict], list[dict]]:
    """Times one step of each model; returns the records and no skip notes."""
    env = environment()
    on_gpu = device == "cuda"
    repeat = repeat or (5 if quick else 10 if on_gpu else 3)
    preset, B, H, W = shape(device, quick)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    models, optimizers, runs = {}, {}, {}
    variants = [("e2evlp", "fused", True, None), ("e2evlp-padded", "fused", False, None),
                ("reference", "reference", False, None), ("e2evlp-compiled", "fused", False, False)]
    if on_gpu:
        variants.append(("e2evlp-compiled-graphs", "fused", False, True))
    for impl, kernels, unpad, graphs in variants:
        torch.manual_seed(0)
        config = getattr(E2EVLPConfig, preset)(kernels=kernels, unpad_encoder=unpad)
        models[impl] = E2EVLPForPretraining(config).to(device).train()
        optimizers[impl] = torch.optim.AdamW([p for p in models[impl].parameters() if p.requires_grad], lr=1e-5)
        runs[impl] = models[impl] if graphs is None else compile_model(models[impl], "default", graphs)
    config = models["e2evlp"].config
    batch = make_batch(config, B, H, W, device)
    padded = dict(batch, targets=pad_targets(batch["targets"], device, bucket=True))

    def step(impl):
        if impl.endswith("-graphs"):
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device_type=device, dtype=dtype, enabled=on_gpu):
            loss = runs[impl](**(padded if runs[impl] is not models[impl] else batch)).loss
        loss.backward()
        optimizers[impl].step()
        optimizers[impl].zero_grad(set_to_none=True)

    compile_s = {}
    for impl in models:
        if runs[impl] is not models[impl]:
            started = time.perf_counter()
            step(impl)
            if on_gpu:
                torch.cuda.synchronize()
            compile_s[impl] = round(time.perf_counter() - started, 1)
    timing = time_interleaved({impl: (lambda impl=impl: step(impl)) for impl in models}, device, warmup=2,
                              repeat=repeat)
    flops, encoder_tokens = step_flops(models["e2evlp"], batch)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None) if on_gpu else None
    case = f"preset={preset} B={B} image={H}x{W} text={batch['input_ids'].shape[1]} tasks=mlm+itm+det+cap"
    records = []
    for impl, t in timing.items():
        seconds = t["ms"] / 1e3
        tflops = flops / seconds / 1e12
        records.append(make_record(BENCH, impl, case, t, device=device, dtype=str(dtype).split(".")[-1],
                                   pass_="step", tflops=round(tflops, 3), env=env,
                                   samples_per_s=round(B / seconds, 2),
                                   tokens_per_s=round(encoder_tokens / seconds, 1),
                                   mfu=None if peak is None else round(tflops / peak, 4),
                                   compile_s=compile_s.get(impl)))
    return records, []


if __name__ == "__main__":
    sys.exit(cli.main(["bench", "train-step", *sys.argv[1:]]))
