"""Trainer: exact resume, atomic checkpoints under SIGKILL, non-finite steps, SIGTERM, accumulation, DDP/FSDP2, logs."""

import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from e2evlp.train import TrainerConfig, latest_checkpoint, load_checkpoint, step_dir
from tests.trainer_helpers import ToyModel, flat_params, logged_losses, make_trainer, read_log

REPO = Path(__file__).resolve().parents[1]
LOG_KEYS = {"step", "epoch", "lr", "loss", "losses", "grad_norm", "samples_per_s", "tokens_per_s",
            "skipped_nonfinite", "elapsed"}


def saved_params(directory) -> torch.Tensor:
    model = ToyModel()
    load_checkpoint(directory, model=model, restore_rng=False)
    return flat_params(model)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """10 steps (6 batches per epoch) with a checkpoint after every other step, all kept."""
    output_dir = tmp_path_factory.mktemp("full")
    trainer = make_trainer(output_dir, max_steps=10, save_every=2, keep_last=0)
    summary = trainer.train()
    return output_dir, summary, flat_params(trainer.module)


# 4: mid-epoch 0; 6: the end of epoch 0; 8: mid-epoch 1.
@pytest.mark.parametrize("resume_step", [4, 6, 8])
def test_resume_reproduces_the_uninterrupted_run_bitwise(full_run, tmp_path, resume_step):
    output_dir, summary, params = full_run
    shutil.copytree(step_dir(output_dir, resume_step), step_dir(tmp_path, resume_step))
    torch.manual_seed(123)  # a differently initialized model: every weight must come from the checkpoint
    resumed = make_trainer(tmp_path, max_steps=10, model=ToyModel())
    resumed_summary = resumed.train()
    assert torch.equal(flat_params(resumed.module), params)
    expected = {step: loss for step, loss in logged_losses(output_dir).items() if step > resume_step}
    assert logged_losses(tmp_path) == expected
    assert resumed_summary["steps"] == 10 and resumed_summary["epochs"] == summary["epochs"]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [step_dir(tmp_path, resume_step).name, "step-00000010"]


def test_short_run_then_longer_resumed_run(tmp_path):
    # A constant learning rate: a run's schedule depends on its max_steps, a resumed one keeps the new one.
    constant = dict(warmup_steps=0, min_lr_ratio=1.0)
    reference = make_trainer(tmp_path / "reference", max_steps=9, **constant)
    reference.train()
    assert make_trainer(tmp_path / "split", max_steps=5, **constant).train()["steps"] == 5
    resumed = make_trainer(tmp_path / "split", max_steps=9, **constant)
    assert resumed.train()["checkpoint"].endswith("step-00000009")
    assert torch.equal(flat_params(resumed.module), flat_params(reference.module))
    assert logged_losses(tmp_path / "split") == logged_losses(tmp_path / "reference")


KILLED_SAVE = """
import sys, time
import safetensors.torch
from e2evlp.train import save_checkpoint, step_dir
from tests.trainer_helpers import ToyModel

def stalled_save(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"half a file")
    print("writing", flush=True)
    time.sleep(120)

safetensors.torch.save_file = stalled_save
save_checkpoint(step_dir(sys.argv[1], int(sys.argv[2])), model=ToyModel(), step=int(sys.argv[2]))
"""


@pytest.mark.parametrize("killed_step", [20, 10], ids=["new-step", "same-step"])
def test_checkpoint_survives_sigkill_mid_write(tmp_path, killed_step):
    trainer = make_trainer(tmp_path, max_steps=10)
    trainer.train()
    params = flat_params(trainer.module)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path), str(killed_step)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([writer.stdout], [], [], 120)
        assert ready and writer.stdout.readline().strip() == "writing"
    finally:
        writer.kill()
        writer.wait()
    assert list(tmp_path.glob(f"step-{killed_step:08d}.tmp-*")), "the kill should leave a staging directory"
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 10)
    assert torch.equal(saved_params(step_dir(tmp_path, 10)), params)
    # A longer run resumes from it, and its next save clears the staging leftovers.
    assert make_trainer(tmp_path, max_steps=11).train()["steps"] == 11
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == \
        ["step-00000010", "step-00000011"]


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, max_steps=6, model=ToyModel(nan_calls={3, 5}), save_every=1, keep_last=0)
    summary = trainer.train()
    assert summary["skipped_nonfinite"] == 2 and summary["steps"] == 6
    params = {step: saved_params(step_dir(tmp_path, step)) for step in range(1, 7)}
    unchanged = [step for step in range(2, 7) if torch.equal(params[step], params[step - 1])]
    assert unchanged == [3, 5]
    events = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "event" in r]
    assert [(e["step"], e["event"], e["loss"]) for e in events] == [(3, "skipped_nonfinite", "nan"),
                                                                  (5, "skipped_nonfinite", "nan")]
    records = {r["step"]: r for r in read_log(tmp_path)}
    assert records[3]["loss"] is None and records[6]["skipped_nonfinite"] == 2


def test_consecutive_nonfinite_steps_stop_with_a_clear_error(tmp_path):
    torch.manual_seed(0)
    model = ToyModel(nan_calls=range(2, 100))
    trainer = make_trainer(tmp_path, max_steps=10, model=model, max_nonfinite_steps=3)
    with pytest.raises(RuntimeError, match=r"3 consecutive non-finite losses up to step 4 .*max_nonfinite_steps=3"):
        trainer.train()


def test_sigterm_saves_and_resumes_to_the_same_result(tmp_path):
    reference = make_trainer(tmp_path / "reference", max_steps=8)
    reference.train()
    handler = signal.getsignal(signal.SIGTERM)
    torch.manual_seed(0)
    interrupted = make_trainer(tmp_path / "run", max_steps=8, model=ToyModel(sigterm_call=5))
    summary = interrupted.train()
    assert summary["stopped"] == "sigterm" and summary["steps"] == 5
    assert latest_checkpoint(tmp_path / "run") == step_dir(tmp_path / "run", 5)
    assert signal.getsignal(signal.SIGTERM) is handler
    resumed = make_trainer(tmp_path / "run", max_steps=8)
    assert resumed.train()["stopped"] == "done"
    assert torch.equal(flat_params(resumed.module), flat_params(reference.module))
    assert logged_losses(tmp_path / "run") == logged_losses(tmp_path / "reference")


def test_a_resumed_run_says_from_which_checkpoint_and_step(tmp_path, capsys):
    assert make_trainer(tmp_path, max_steps=2).train()["resumed_from"] is None
    assert "resumed" not in capsys.readouterr().out
    summary = make_trainer(tmp_path, max_steps=4).train()
    resumed_from = {"checkpoint": str(step_dir(tmp_path, 2)), "step": 2}
    assert summary["resumed_from"] == resumed_from and summary["steps"] == 4
    assert f"resumed from {step_dir(tmp_path, 2)} at step 2" in capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    events = [r for r in records if "event" in r]
    assert events == [{"event": "resumed", "step": 2, "epoch": 0, "resumed_from": resumed_from}]
    assert records.index(events[0]) == 2  # after the first run's two steps, before the resumed run's


def test_a_sigterm_stop_ends_the_log_with_its_marker_and_a_finished_run_does_not(tmp_path, capsys):
    torch.manual_seed(0)
    summary = make_trainer(tmp_path, max_steps=8, model=ToyModel(sigterm_call=3)).train()
    assert summary["stopped"] == "sigterm" and summary["steps"] == 3
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert last == {"event": "stopped_by_sigterm", "step": 3, "epoch": 0, "checkpoint": str(step_dir(tmp_path, 3))}
    assert f"stopped by SIGTERM at step 3: checkpoint {step_dir(tmp_path, 3)}" in capsys.readouterr().out
    make_trainer(tmp_path, max_steps=4).train()
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert "event" not in last and last["step"] == 4


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    runs = {}
    for accum, batch_size in [(2, 4), (1, 8)]:
        torch.manual_seed(0)
        trainer = make_trainer(tmp_path / f"accum{accum}", max_steps=3, model=ToyModel(dropout=0.0),
                               batch_size=batch_size, grad_accum_steps=accum)
        summary = trainer.train()
        runs[accum] = flat_params(trainer.module), summary
    torch.testing.assert_close(runs[2][0], runs[1][0], rtol=1e-5, atol=1e-6)
    assert runs[2][1]["loss"] == pytest.approx(runs[1][1]["loss"], rel=1e-5)
    assert all(r["samples_per_s"] > 0 for r in read_log(tmp_path / "accum2"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_autocast_runs_on_cpu(tmp_path, precision):
    trainer = make_trainer(tmp_path, max_steps=3, precision=precision)
    summary = trainer.train()
    assert summary["skipped_nonfinite"] == 0 and torch.isfinite(torch.tensor(summary["loss"]))
    assert (trainer.scaler is not None) == (precision == "fp16")
    assert make_trainer(tmp_path, max_steps=4, precision=precision).train()["steps"] == 4  # scaler state resumes


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_cuda_mixed_precision_trains_and_resumes(tmp_path, precision):
    reference = make_trainer(tmp_path / "reference", max_steps=6, precision=precision, save_every=3, keep_last=0,
                             device="cuda")
    summary = reference.train()
    assert reference.autocast_dtype == {"auto": torch.bfloat16, "fp16": torch.float16}[precision]
    assert all(group["fused"] for group in reference.optimizer.param_groups)
    assert summary["skipped_nonfinite"] == 0 and torch.isfinite(torch.tensor(summary["loss"]))
    shutil.copytree(step_dir(tmp_path / "reference", 3), step_dir(tmp_path / "resumed", 3))
    resumed = make_trainer(tmp_path / "resumed", max_steps=6, precision=precision, device="cuda")
    resumed.train()
    torch.testing.assert_close(flat_params(resumed.module), flat_params(reference.module))


def test_log_records_have_the_documented_keys(tmp_path):
    summary = make_trainer(tmp_path, max_steps=5, log_every=2).train()
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 5]
    for record in records:
        assert set(record) == LOG_KEYS
        assert set(record["losses"]) == {"regression", "classification"}
        assert set(record["lr"]) == {"main", "main_no_decay"}
        assert record["tokens_per_s"] > 0 and record["samples_per_s"] > 0 and record["grad_norm"] > 0
    assert set(summary) == {"steps", "epochs", "skipped_nonfinite", "stopped", "samples_per_s", "tokens_per_s",
                            "loss", "losses", "seconds", "checkpoint", "resumed_from"}
    assert summary["loss"] == records[-1]["loss"]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_the_package_is_a_clear_import_error(tmp_path):
    with pytest.raises(ImportError, match="tensorboard"):
        make_trainer(tmp_path, max_steps=2, tensorboard=True)


def test_tensorboard_scalars_when_the_package_is_installed(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    make_trainer(tmp_path, max_steps=3, tensorboard=True).train()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "lr/main", "losses/regression"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3]


@pytest.mark.parametrize("field, value", [("grad_accum_steps", 0), ("precision", "fp8"), ("distributed", "foo"),
                                          ("max_steps", 0), ("warmup_steps", 11), ("decay", "step"),
                                          ("log_every", 0), ("keep_last", -1), ("max_grad_norm", -1.0)])
def test_bad_config_values_name_the_field(tmp_path, field, value):
    settings = {"output_dir": str(tmp_path), "max_steps": 10, field: value}
    with pytest.raises(ValueError, match=rf"TrainerConfig\.{field} must be"):
        TrainerConfig(**settings)


@pytest.mark.parametrize("field, value", [("lr", "abc"), ("lr", None), ("max_grad_norm", "none"),
                                          ("weight_decay", [0.1]), ("min_lr_ratio", "0.5")])
def test_config_values_of_the_wrong_type_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"TrainerConfig\.{field} must be"):
        TrainerConfig(output_dir=str(tmp_path), max_steps=10, **{field: value})


def test_a_new_run_refuses_a_folder_with_checkpoints(tmp_path):
    make_trainer(tmp_path, max_steps=2).train()
    with pytest.raises(ValueError, match="resume is False but .* already holds checkpoints"):
        make_trainer(tmp_path, max_steps=4, resume=False).train()
    assert latest_checkpoint(tmp_path) == step_dir(tmp_path, 2)


def test_resuming_with_other_settings_says_what_is_kept(tmp_path):
    make_trainer(tmp_path, max_steps=2).train()
    with pytest.warns(UserWarning, match=r"\(lr 0\.01 -> 0\.001, grad_accum_steps 1 -> 2\).* stay those of the "
                                         r"checkpoint's optimizer"):
        resumed = make_trainer(tmp_path, max_steps=3, lr=1e-3, grad_accum_steps=2)
        resumed.train()
    assert resumed.step == 3


def test_optimizer_state_is_keyed_by_parameter_name_and_old_saves_still_resume(tmp_path):
    make_trainer(tmp_path, max_steps=2).train()
    path = latest_checkpoint(tmp_path) / "training_state.pt"
    state = torch.load(path, weights_only=True)
    names = [name for group in state["optimizer"]["param_groups"] for name in group["params"]]
    assert "embed.0.weight" in names and all(isinstance(name, str) for name in names)
    trainer = make_trainer(tmp_path / "index-keyed", max_steps=2)
    trainer.train()
    state["optimizer"] = trainer.optimizer.state_dict()  # how checkpoints of one process used to be keyed
    torch.save(state, path)
    resumed = make_trainer(tmp_path, max_steps=3)
    resumed.train()
    assert resumed.step == 3


def test_resume_on_another_number_of_processes_keeps_the_share_of_the_epoch(tmp_path, monkeypatch):
    from e2evlp.train import trainer as trainer_module

    trainer = make_trainer(tmp_path, max_steps=2)
    path = tmp_path / "step-00000002"
    assert trainer._resumed_batch(path, {"batch_in_epoch": 3, "world_size": 1}) == 3
    monkeypatch.setattr(trainer_module.dist_utils, "world_size", lambda: 2)
    with pytest.warns(UserWarning, match="saved by 1 processes and resumes on 2: epoch 0 continues at batch 1"):
        assert trainer._resumed_batch(path, {"batch_in_epoch": 3, "world_size": 1}) == 1
    monkeypatch.setattr(trainer_module.dist_utils, "world_size", lambda: 1)
    with pytest.warns(UserWarning, match="at batch 6 of each rank"):  # 4 x 2 batches, but 6 in an epoch here
        assert trainer._resumed_batch(path, {"batch_in_epoch": 2, "world_size": 4}) == 6


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    """One 2-process torchrun (gloo, CPU) that trains under DDP, then under FSDP2 (tests/ddp_worker.py)."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    output_dir = tmp_path_factory.mktemp("torchrun")
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", E2EVLP_ATTENTION="sdpa", PYTHONPATH=python_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests" / "ddp_worker.py"), str(output_dir), "ddp", "fsdp"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return output_dir


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_run_keeps_ranks_identical_and_resumes(torchrun_results, mode):
    results = [torch.load(torchrun_results / f"{mode}-rank{rank}.pt") for rank in range(2)]
    assert torch.equal(results[0]["full"], results[1]["full"])
    # Resuming a copy of the step-4 checkpoint reproduces the uninterrupted run's last steps exactly.
    assert torch.equal(results[0]["resumed"], results[0]["full"])
    assert results[0]["summary"]["steps"] == 6 and results[0]["summary"]["stopped"] == "done"
    assert results[0]["fsdp_units"] == {"ddp": 0, "fsdp": 3}[mode]  # two attention layers and the root
    assert [r["step"] for r in read_log(torchrun_results / mode / "full")] == list(range(1, 7))  # rank 0 only
    checkpoint = latest_checkpoint(torchrun_results / mode / "full")
    assert checkpoint == step_dir(torchrun_results / mode / "full", 6)
    model = ToyModel(attention_layers=2)
    load_checkpoint(checkpoint, model=model, restore_rng=False)
    assert torch.equal(flat_params(model), results[0]["full"])


def test_fsdp_and_ddp_train_alike(torchrun_results):
    ddp, fsdp = (torch.load(torchrun_results / f"{mode}-rank0.pt")["full"] for mode in ("ddp", "fsdp"))
    torch.testing.assert_close(fsdp, ddp, rtol=1e-4, atol=1e-5)
    crossed = torch.load(torchrun_results / "ddp-to-fsdp-rank0.pt")["resumed"]  # a DDP checkpoint resumed by FSDP
    torch.testing.assert_close(crossed, ddp, rtol=1e-4, atol=1e-5)
    for mode in ("ddp", "fsdp"):  # the task losses are all ranks' means, like the loss, so they add up to it
        for record in read_log(torchrun_results / mode / "full"):
            assert record["loss"] == pytest.approx(sum(record["losses"].values()), rel=1e-5)
