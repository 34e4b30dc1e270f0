"""The pre-training step as one compiled graph: fullgraph torch.compile equals eager, padded targets do not
recompile, refused matchings come back as a tensor, and the Trainer's compile and CUDA-graph settings."""

import copy
from dataclasses import dataclass

import pytest
import torch
import torch._dynamo.testing
import torch._inductor.config
import torch.nn.functional as F
from torch import nn

from e2evlp import nn as enn
from e2evlp.models import (
    E2EVLPConfig,
    E2EVLPForCaptioning,
    E2EVLPForNLVR2,
    E2EVLPForPretraining,
    E2EVLPForRetrieval,
    E2EVLPForVQA,
)
from e2evlp.train.trainer import Trainer, TrainerConfig, compile_model
from tests.model_helpers import tiny_batch
from tests.trainer_helpers import CLASSES, FEATURES, toy_loader


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles from scratch; Inductor draws dropout masks with eager's generator, so that a
    compiled run with the same seed sees the same masks as the eager one."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def padded_layout_model(cls=E2EVLPForPretraining, **fields):
    torch.manual_seed(0)
    return cls(E2EVLPConfig.tiny(unpad_encoder=False, **fields))


def loss_and_grads(model, batch, run=None, seed=1):
    """The training loss of `run` (default: `model`) and every parameter's gradient, dropout drawn from `seed`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = (model if run is None else run)(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_compiled_equals_eager(model, batch, backend):
    eager_loss, eager_grads = loss_and_grads(model, batch)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss, grads = loss_and_grads(model, batch, compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        # Relative to the parameter's largest entry; the floor is for gradients that are zero in exact arithmetic
        # (an attention key's bias shifts every score of a query alike), where both sides hold rounding noise.
        error = (grad - eager_grads[name]).abs().max()
        allowed = 1e-4 * eager_grads[name].abs().max() + 1e-6
        assert error <= allowed, f"{name}: gradient differs from eager's by {error:.2e} (allowed {allowed:.2e})"


def padded_batch(sizes=(3, 0)):
    """tiny_batch with `sizes` targets per image, padded as the collator's static_shapes gives them."""
    batch = tiny_batch()
    g = torch.Generator().manual_seed(sum(sizes))
    batch["targets"] = enn.pad_targets(
        [{"labels": torch.randint(0, 20, (n,), generator=g),
          "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.3 + 0.1],
                             1),
          "attributes": torch.randint(-1, 8, (n,), generator=g)} for n in sizes], "cpu", bucket=True)
    return batch


def test_pretraining_step_compiles_as_one_graph_with_inductor_and_equals_eager():
    """All four tasks, matcher, criterion and aux layers in one graph (fullgraph), Inductor's code against eager."""
    assert_compiled_equals_eager(padded_layout_model(), padded_batch(), "inductor")


def test_pretraining_with_detr_list_targets_compiles_as_one_graph():
    assert_compiled_equals_eager(padded_layout_model(), tiny_batch(), "aot_eager")


def test_padded_targets_do_not_recompile_within_a_bucket():
    model = padded_layout_model()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for sizes in ((3, 0), (5, 2), (8, 1), (0, 0)):  # all padded to 8 slots
        compiled(**padded_batch(sizes)).loss.backward()
    assert counter.frame_count == 1
    compiled(**padded_batch((9, 1))).loss.backward()  # 16 slots: a new shape
    assert counter.frame_count == 2


def task_cases():
    batch = tiny_batch()
    images = (batch["pixel_values"], batch["pixel_mask"])
    text = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    soft = torch.zeros(2, E2EVLPConfig.tiny().num_answers)
    soft[0, 3], soft[1, 5] = 1.0, 0.3
    pair = dict(pixel_values=torch.stack([images[0], images[0].flip(0)], 1),
                pixel_mask=torch.stack([images[1], images[1].flip(0)], 1))
    return [(E2EVLPForVQA, dict(pixel_values=images[0], pixel_mask=images[1], labels=soft, **text)),
            (E2EVLPForNLVR2, dict(pair, labels=torch.tensor([0, 1]), **text)),
            (E2EVLPForRetrieval, dict(pixel_values=images[0], pixel_mask=images[1], labels=torch.tensor([1, 0]),
                                      **text)),
            (E2EVLPForCaptioning, dict(pixel_values=images[0], pixel_mask=images[1], caption_ids=batch["caption_ids"],
                                       caption_mask=batch["caption_mask"]))]


@pytest.mark.parametrize("cls, batch", task_cases(), ids=lambda case: getattr(case, "__name__", ""))
def test_task_model_training_forward_compiles_as_one_graph(cls, batch):
    assert_compiled_equals_eager(padded_layout_model(cls), batch, "aot_eager")


def test_refused_matchings_come_back_as_a_tensor_when_not_validating():
    """validate=False (what a compiled step runs): a NaN target box is neither checked on the host nor raised;
    the refused problems are counted in matching_failures for the Trainer's one read."""
    model = padded_layout_model()
    batch = padded_batch((3, 2))
    batch["targets"].boxes[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        model(**batch)
    model.criterion.validate = False
    out = model(**batch)
    assert out.matching_failures.item() == model.config.num_decoder_layers  # image 0 in every layer
    assert "matching_failures" not in out.detection_losses


def test_criterion_takes_padded_targets_as_it_takes_lists():
    model = padded_layout_model()
    batch = padded_batch((3, 2))
    as_lists = dict(batch, targets=batch["targets"].to_list())
    torch.manual_seed(1)
    padded = model(**batch)
    torch.manual_seed(1)
    listed = model(**as_lists)
    assert padded.detection_losses.keys() == listed.detection_losses.keys()
    for name, value in padded.detection_losses.items():
        torch.testing.assert_close(value, listed.detection_losses[name], msg=name)


# ---- the Trainer ----------------------------------------------------------------------------------------




@dataclass
class StepOutput:
    loss: torch.Tensor
    losses: dict
    matching_failures: torch.Tensor | None = None


class CompilableToy(nn.Module):
    """The toy loader's regression + classification, with no Python state that changes between calls."""

    def __init__(self, matching_failures: float | None = None):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, 16), nn.GELU(), nn.Dropout(0.1), nn.LayerNorm(16))
        self.regression, self.classifier = nn.Linear(16, 1), nn.Linear(16, CLASSES)
        self.matching_failures = matching_failures

    def forward(self, inputs, target, labels, attention_mask):
        weights = attention_mask.unsqueeze(-1).float()
        pooled = (self.body(inputs) * weights).sum(1) / weights.sum(1)
        losses = {"regression": F.mse_loss(self.regression(pooled).squeeze(-1), target),
                  "classification": F.cross_entropy(self.classifier(pooled), labels)}
        failures = None if self.matching_failures is None else torch.tensor(self.matching_failures)
        return StepOutput(losses["regression"] + losses["classification"], losses, failures)


def train_toy(output_dir, model, **config):
    settings = dict(lr=1e-2, warmup_steps=2, log_every=1, progress=False, max_steps=4) | config
    trainer = Trainer(model, TrainerConfig(output_dir=str(output_dir), **settings), toy_loader(batch_size=4),
                      device="cpu")
    return trainer, trainer.train()


def test_trainer_compiled_run_equals_eager_run(tmp_path):
    torch.manual_seed(0)
    eager_model = CompilableToy()
    compiled_model = copy.deepcopy(eager_model)
    _, eager = train_toy(tmp_path / "eager", eager_model)
    trainer, compiled = train_toy(tmp_path / "compiled", compiled_model, compile="default")
    assert trainer.step_model is not trainer.model  # checkpoints still see the plain module
    assert compiled["steps"] == eager["steps"] == 4
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_trainer_stops_on_refused_matchings_with_a_finite_loss(tmp_path):
    with pytest.raises(ValueError, match=r"refused 1 matching problem"):
        train_toy(tmp_path, CompilableToy(matching_failures=1.0))
    _, summary = train_toy(tmp_path / "none", CompilableToy(matching_failures=0.0))
    assert summary["steps"] == 4


def test_trainer_compile_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"TrainerConfig.compile must be one of"):
        TrainerConfig(output_dir=str(tmp_path), max_steps=1, compile="reduce-overhead")
    with pytest.raises(ValueError, match=r"TrainerConfig.cuda_graphs must be a bool, and true only with compile"):
        TrainerConfig(output_dir=str(tmp_path), max_steps=1, cuda_graphs=True)
    config = TrainerConfig(output_dir=str(tmp_path), max_steps=1, compile="default", cuda_graphs=True)
    with pytest.raises(ValueError, match=r"cuda_graphs needs a CUDA device, got cpu"):
        Trainer(CompilableToy(), config, toy_loader(), device="cpu")
    with pytest.raises(ValueError, match=r"compile mode must be one of"):
        compile_model(CompilableToy(), "none", False)


@pytest.mark.cuda
def test_whole_optimizer_step_makes_no_host_sync_after_warmup():
    """Forward, backward, clip and AdamW in the padded layout under set_sync_debug_mode("error")."""
    device = torch.device("cuda")
    model = padded_layout_model().to(device)
    model.criterion.validate = False
    batch = padded_batch((3, 2))
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step() for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)


def test_compiled_runs_take_the_padded_layout():
    from e2evlp.train.launch import _padded_layout

    assert _padded_layout({"model": {"config": {}}}) is False
    with pytest.raises(ValueError, match=r"train.compile needs the padded encoder layout"):
        _padded_layout({"model": {"config": {"unpad_encoder": True}}})
