"""Optimizer groups, warmup schedules and checkpoints (atomic publish, bitwise-identical resume)."""

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from e2evlp.models import E2EVLPConfig, E2EVLPForPretraining
from e2evlp.train import (
    build_optimizer,
    latest_checkpoint,
    load_checkpoint,
    param_groups,
    save_checkpoint,
    step_dir,
    warmup_schedule,
)
from e2evlp.train import checkpoint as checkpoint_module
from tests.model_helpers import tiny_batch


def tiny_vlp() -> E2EVLPForPretraining:
    # reference kernels: the fused attention would run in Triton's (slow) CPU interpreter here.
    return E2EVLPForPretraining(E2EVLPConfig.tiny(backbone="resnet18", backbone_trainable_stages=2,
                                                  kernels="reference"))


def test_param_groups_cover_every_trainable_param_once():
    model = tiny_vlp()
    groups = param_groups(model, lr=1e-4, backbone_lr=1e-5, weight_decay=0.01)
    owner = {id(p): g for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(owner)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(owner) == {id(p) for p in trainable.values()}
    assert any(not p.requires_grad for p in model.model.backbone.parameters())  # frozen stages left out
    for name, p in trainable.items():
        group = owner[id(p)]
        assert group["lr"] == (1e-5 if name.startswith("model.backbone.") else 1e-4), name
        no_decay = name.endswith(".bias") or "norm" in name.lower() or p.ndim == 1
        assert group["weight_decay"] == (0.0 if no_decay else 0.01), name
    # The word embeddings are tied to both LM heads' decoders: one tensor, one entry.
    words = model.model.embeddings.word_embeddings.weight
    assert model.mlm_head.decoder.weight is words and owner[id(words)]["weight_decay"] == 0.01


def test_build_optimizer_on_cpu_is_not_fused():
    optimizer = build_optimizer(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(not g["fused"] and g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 for g in optimizer.param_groups)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.01]


def schedule_factors(decay: str, steps: list[int]) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = warmup_schedule(optimizer, warmup_steps=10, total_steps=110, decay=decay, min_ratio=0.1)
    return [scheduler.lr_lambdas[0](s) for s in steps]


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_warmup_schedule_values(decay):
    # steps: start, mid-warmup, end of warmup, a quarter into decay, half-way, end, after the end
    factors = schedule_factors(decay, [0, 5, 10, 35, 60, 110, 500])
    quarter = 0.5 * (1 + math.cos(math.pi / 4)) if decay == "cosine" else 0.75
    expected = [0.0, 0.5, 1.0, 0.1 + 0.9 * quarter, 0.1 + 0.9 * 0.5, 0.1, 0.1]
    assert factors == pytest.approx(expected, abs=1e-12)


def test_warmup_schedule_drives_the_optimizer_lr():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = warmup_schedule(optimizer, warmup_steps=4, total_steps=8, decay="linear")
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 1.5, 1.0, 0.5, 0.0, 0.0])


@pytest.mark.parametrize("kwargs, argument", [(dict(warmup_steps=20, total_steps=10), "warmup_steps"),
                                              (dict(warmup_steps=1, total_steps=0), "total_steps"),
                                              (dict(warmup_steps=1, total_steps=10, decay="step"), "decay"),
                                              (dict(warmup_steps=1, total_steps=10, min_ratio=2.0), "min_ratio")])
def test_warmup_schedule_rejects_bad_arguments(kwargs, argument):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=argument):
        warmup_schedule(optimizer, **kwargs)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def small_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Small()
    optimizer = build_optimizer(model, lr=1e-2)
    return model, optimizer, warmup_schedule(optimizer, warmup_steps=2, total_steps=10)


def small_step(model, optimizer, scheduler) -> float:
    # Data and dropout both draw from the global generators, so an unrestored RNG changes the loss.
    x = torch.randn(4, 8) + float(np.random.rand()) + random.random()
    loss = model(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def test_resume_is_bitwise_identical(tmp_path):
    model, optimizer, scheduler = small_setup()
    for _ in range(3):
        small_step(model, optimizer, scheduler)
    save_checkpoint(step_dir(tmp_path, 3), model=model, optimizer=optimizer, scheduler=scheduler, step=3,
                    extra={"epoch": 1, "best": torch.tensor(0.5)})
    after = [small_step(model, optimizer, scheduler) for _ in range(2)]

    model, optimizer, scheduler = small_setup(seed=123)
    state = load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=optimizer, scheduler=scheduler)
    assert state["step"] == 3 and state["extra"]["epoch"] == 1 and state["extra"]["best"].item() == 0.5
    assert scheduler.last_epoch == 3
    assert [small_step(model, optimizer, scheduler) for _ in range(2)] == after


def vlp_step(model, optimizer, scheduler) -> float:
    loss = model(**tiny_batch(seed=int(torch.randint(100, ())))).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def test_resume_e2evlp_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    model = tiny_vlp()
    optimizer = build_optimizer(model)
    scheduler = warmup_schedule(optimizer, warmup_steps=1, total_steps=5)
    vlp_step(model, optimizer, scheduler)
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, scheduler=scheduler, step=1)
    assert (tmp_path / "ckpt" / "config.json").is_file()  # written by save_pretrained
    after = [vlp_step(model, optimizer, scheduler) for _ in range(2)]

    torch.manual_seed(1)
    model = tiny_vlp()
    optimizer = build_optimizer(model)
    scheduler = warmup_schedule(optimizer, warmup_steps=1, total_steps=5)
    load_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, scheduler=scheduler)
    assert model.mlm_head.decoder.weight is model.model.embeddings.word_embeddings.weight  # still tied
    assert [vlp_step(model, optimizer, scheduler) for _ in range(2)] == after


def failing_publish(real_replace):
    """os.replace that fails the staging directory's rename, the publish itself, like a kill at that point."""

    def replace(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError("killed")
        real_replace(src, dst)

    return replace


def test_failed_publish_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = small_setup()
    target = tmp_path / "ckpt"
    save_checkpoint(target, model=model, optimizer=optimizer, scheduler=scheduler, step=1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    small_step(model, optimizer, scheduler)

    monkeypatch.setattr(checkpoint_module.os, "replace", failing_publish(os.replace))
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(target, model=model, optimizer=optimizer, scheduler=scheduler, step=2)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or .old left behind
    fresh, optimizer, scheduler = small_setup(seed=5)
    assert load_checkpoint(target, model=fresh, optimizer=optimizer, scheduler=scheduler)["step"] == 1
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())


def test_save_over_an_existing_checkpoint(tmp_path):
    model, optimizer, scheduler = small_setup()
    save_checkpoint(tmp_path / "ckpt", model=model, step=1)
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, scheduler=scheduler, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer)["step"] == 2


def test_latest_checkpoint_ignores_incomplete_directories(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model, _, _ = small_setup()
    save_checkpoint(step_dir(tmp_path, 2), model=model, step=2)
    save_checkpoint(step_dir(tmp_path, 10), model=model, step=10)
    (tmp_path / "step-00000020.tmp-999").mkdir()  # a save killed before publishing
    for name in checkpoint_module.WEIGHTS_NAME, checkpoint_module.STATE_NAME:
        (tmp_path / "step-00000020.tmp-999" / name).write_bytes(b"")
    step_dir(tmp_path, 30).mkdir()  # weights only: not a checkpoint
    (step_dir(tmp_path, 30) / checkpoint_module.WEIGHTS_NAME).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 10)


def test_training_state_loads_with_weights_only(tmp_path):
    model, optimizer, scheduler = small_setup()
    small_step(model, optimizer, scheduler)
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, scheduler=scheduler, step=1,
                    extra={"tokens": [1, 2]})
    state = torch.load(tmp_path / "ckpt" / checkpoint_module.STATE_NAME, weights_only=True)
    assert set(state) == {"step", "extra", "rng", "optimizer", "scheduler"}
    assert set(state["rng"]) >= {"torch", "numpy", "python"}


def test_load_errors_name_the_problem(tmp_path):
    model, optimizer, _ = small_setup()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path, model=model)
    save_checkpoint(tmp_path / "ckpt", model=model, step=1)
    with pytest.raises(ValueError, match="net.4.weight"):
        load_checkpoint(tmp_path / "ckpt", model=nn.Sequential(nn.Linear(8, 16)))
    with pytest.raises(ValueError, match="optimizer"):
        load_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer)


def test_save_recovers_a_checkpoint_left_aside_by_a_kill(tmp_path, monkeypatch):
    model, _, _ = small_setup()
    save_checkpoint(tmp_path / "ckpt", model=model, step=1)
    os.replace(tmp_path / "ckpt", tmp_path / "ckpt.old")  # killed between moving the old one aside and publishing
    monkeypatch.setattr(checkpoint_module.os, "replace", failing_publish(os.replace))
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path / "ckpt", model=model, step=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_checkpoint(tmp_path / "ckpt", model=model)["step"] == 1


def test_warmup_to_total_ends_at_min_ratio():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    factor = warmup_schedule(optimizer, warmup_steps=4, total_steps=4, min_ratio=0.2).lr_lambdas[0]
    assert [factor(s) for s in (0, 2, 4, 9)] == [0.0, 0.5, 0.2, 0.2]
