"""What a new user hit: a short trial of a shipped config, the torchrun hint to evaluate, subcommand errors and help,
caption's --device and --max-length."""

import json
import shlex
from pathlib import Path

import pytest
import yaml

from e2evlp import cli
from e2evlp.models import E2EVLPForCaptioning
from e2evlp.train import launch
from tests.test_cli_train import _coco, _json_out, _write_config, cli_error, synthetic  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def sdpa_attention(monkeypatch):
    monkeypatch.setenv("E2EVLP_ATTENTION", "sdpa")


@pytest.fixture(scope="module")
def pretrained(synthetic, tmp_path_factory):  # noqa: F811
    """A one-step pre-training run with a val set: (its config file, its final/ export)."""
    paths, root = synthetic["paths"], tmp_path_factory.mktemp("pretrained")
    config = _write_config(root / "pretrain.yaml", synthetic,
                           {"train": [_coco(paths, "train")], "val": [_coco(paths, "val")]}, root / "run")
    assert cli.main(["pretrain", "--config", str(config), "train.max_steps=1", "data.batch_size=2"]) == 0
    return config, root / "run" / "final"


def test_a_short_trial_of_the_shipped_tiny_config_warms_up_within_it(synthetic, tmp_path, capsys):  # noqa: F811
    train_set = json.dumps([_coco(synthetic["paths"], "train")])
    with pytest.warns(UserWarning, match=r"train\.warmup_steps=100 is more than train\.max_steps=2: warming up "
                                         r"over all 2 steps"):
        status = cli.main(["pretrain", "--config", str(REPO / "configs" / "pretrain_tiny.yaml"),
                           f"tokenizer={synthetic['paths']['tokenizer']}", f"data.train={train_set}", "data.val=null",
                           "data.batch_size=2", "data.num_workers=0", f"train.output_dir={tmp_path / 'trial'}",
                           "train.max_steps=2", "train.progress=false"])
    assert status == 0
    summary = _json_out(capsys)
    assert summary["steps"] == 2 and summary["stopped"] == "done"
    saved = yaml.safe_load((Path(summary["final"]) / "run_config.yaml").read_text())
    assert saved["train"]["warmup_steps"] == 2  # the export records what the run did


def test_the_torchrun_hint_to_evaluate_is_a_command_that_runs(pretrained, capsys):
    _, final = pretrained
    # What a torchrun run prints (it skips the evaluation), word for word, and the same with the run folder.
    hint = launch.evaluate_command("pretrain", final)
    assert hint == f"e2evlp evaluate pretrain --checkpoint {final}"
    for argv in (shlex.split(hint)[1:], ["evaluate", "pretrain", "--checkpoint", str(final.parent)]):
        capsys.readouterr()
        assert cli.main(argv) == 0
        assert {"itm_acc", "det_ap50", "caption_cider"} <= set(_json_out(capsys))


def test_evaluate_without_config_needs_an_exported_run(pretrained, tmp_path, capsys):
    _, final = pretrained
    step = sorted(final.parent.glob("step-*"))[-1]
    error = cli_error(capsys, ["evaluate", "pretrain", "--checkpoint", str(step)])
    assert "holds no run_config.yaml" in error and "--config" in error


def test_a_subcommand_error_shows_that_subcommands_usage(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    cases = {"evaluate": ["evaluate", "pretrain", "--checkpoint", missing],
             "caption": ["caption", "a.png", "--checkpoint", missing, "--bogus"],
             "pretrain": ["pretrain", "--config", str(tmp_path / "missing.yaml")]}
    for command, argv in cases.items():
        error = cli_error(capsys, argv)
        assert error.startswith(f"usage: e2evlp {command} "), error
        assert f"e2evlp {command}: error:" in error


def _options(command: str) -> dict:
    parser = cli.build_parser()
    subparser = cli._command_parser(parser, cli.argparse.Namespace(command=command))
    return {option: action for action in subparser._actions for option in action.option_strings}


def test_evaluate_and_caption_options_have_help_and_show_their_defaults():
    evaluate, caption = _options("evaluate"), _options("caption")
    assert "default val" in evaluate["--split"].help % {"default": evaluate["--split"].default}
    for name in ("--checkpoint", "--num-beams", "--image-size", "--max-length", "--device", "--tokenizer"):
        action = caption[name]
        assert action.help, name
        text = action.help % {"default": action.default}
        assert "default" in text or action.required, name
    assert "default 3" in caption["--num-beams"].help % {"default": caption["--num-beams"].default}
    assert "default" in evaluate["--config"].help and not evaluate["--config"].required


def test_caption_runs_where_device_says_and_stops_at_max_length(pretrained, synthetic, monkeypatch,  # noqa: F811
                                                               capsys):
    _, final = pretrained
    calls, generate = [], E2EVLPForCaptioning.generate

    def recording_generate(self, pixel_values, pixel_mask=None, **kwargs):
        calls.append((pixel_values.device.type, next(self.parameters()).device.type, kwargs["max_length"]))
        return generate(self, pixel_values, pixel_mask, **kwargs)

    monkeypatch.setattr(E2EVLPForCaptioning, "generate", recording_generate)
    images = [str(p) for p in sorted(Path(synthetic["paths"]["val"]["images"]).glob("*.png"))[:2]]
    capsys.readouterr()
    assert cli.main(["caption", *images, "--checkpoint", str(final), "--device", "cpu", "--max-length", "1",
                     "--num-beams", "1"]) == 0
    lines = capsys.readouterr().out.strip("\n").split("\n")
    assert [line.split("\t")[0] for line in lines] == images
    assert all(len(line.split("\t")[1].split()) <= 1 for line in lines)
    assert calls == [("cpu", "cpu", 1)]
    assert "not a device" in cli_error(capsys, ["caption", images[0], "--checkpoint", str(final),
                                                "--device", "gpu0"])
    assert "--max-length must be >= 1" in cli_error(capsys, ["caption", images[0], "--checkpoint", str(final),
                                                             "--max-length", "0"])
