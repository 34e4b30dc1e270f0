"""The `e2evlp` subcommands that train and use models: demo, pretrain, finetune, evaluate, caption."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields

from e2evlp.demo_config import DemoConfig

FINETUNE_TASKS = ("vqa", "nlvr2", "caption", "retrieval")
EVALUATE_TASKS = ("pretrain", "vqa", "nlvr2", "caption", "retrieval", "detection")
# DemoConfig's fields that `e2evlp demo` takes as options, with their help
DEMO_OPTIONS = {"steps": "pre-training steps", "vqa_steps": "VQA fine-tuning steps",
                "num_train": "synthetic training images", "num_val": "synthetic held-out images"}
STOPPED_BY_SIGTERM = 143  # exit status of a run that SIGTERM stopped at a checkpoint: 128 + SIGTERM


def _print_json(payload: dict) -> None:
    print(json.dumps(payload, indent=2, default=str))


def cmd_demo(args: argparse.Namespace) -> int:
    from e2evlp.demo import results_table, run_demo

    demo = DemoConfig(**{name: getattr(args, name) for name in DEMO_OPTIONS})
    results = run_demo(args.out, demo=demo, draw=not args.no_picture)
    print(results_table(results))
    print(f"\n{results['vqa_method']}; {results['seconds']} s on {results['device']}.")
    print(f"results: {args.out}/results.json" + (f", picture: {results['picture']}" if "picture" in results else ""))
    return 0


def _load_config(args: argparse.Namespace) -> dict:
    from e2evlp.train.run_config import load_run_config

    path = args.config
    if path is None and getattr(args, "checkpoint", None) is not None:  # evaluate: the run config saved with it
        from e2evlp.train.launch import saved_run_config

        path = saved_run_config(args.checkpoint)
    return load_run_config(path, args.overrides)


def _train(task: str, args: argparse.Namespace) -> int:
    from e2evlp.train.launch import train

    summary = train(task, _load_config(args))
    if int(os.environ.get("RANK", "0")) == 0:  # the other ranks of a torchrun job stay quiet
        _print_json(summary)
    # Stopped by SIGTERM at a checkpoint, unfinished: 128 + SIGTERM, so that a retry loop resumes it.
    return STOPPED_BY_SIGTERM if summary.get("stopped") == "sigterm" else 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    return _train("pretrain", args)


def cmd_finetune(args: argparse.Namespace) -> int:
    return _train(args.task, args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from e2evlp.train.launch import evaluate

    _print_json(evaluate(args.task, _load_config(args), args.checkpoint, split=args.split))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """Exit status 0 when every image decodes, 1 when some do not (they are listed)."""
    from e2evlp.train.launch import check_data

    result = check_data(args.task, _load_config(args), split=args.split, workers=args.workers)
    _print_json(result)
    return 1 if result["bad"] else 0


def cmd_caption(args: argparse.Namespace) -> int:
    from e2evlp.train.launch import caption_images

    captions = caption_images(args.images, args.checkpoint, tokenizer_dir=args.tokenizer, num_beams=args.num_beams,
                              image_size=args.image_size, max_length=args.max_length, device=args.device)
    for path, caption in zip(args.images, captions):
        print(f"{path}\t{caption}")
    return 0


def _config_arguments(parser: argparse.ArgumentParser, required: bool = True,
                      help: str = "run config (YAML; see configs/)") -> None:
    parser.add_argument("--config", required=required, default=None, metavar="FILE", help=help)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. train.lr=3e-4 data.batch_size=16")


def add_commands(commands) -> None:
    """Registers the subcommands on the `e2evlp` parser's subparsers."""
    demo = commands.add_parser("demo", help="synthetic data → pre-train the tiny model → evaluate (the default job)")
    demo.add_argument("--out", default="demo-output", metavar="DIR", help="output folder (default demo-output)")
    defaults = {field.name: field.default for field in fields(DemoConfig)}
    for name, help_text in DEMO_OPTIONS.items():
        demo.add_argument(f"--{name.replace('_', '-')}", type=int, default=defaults[name],
                          help=f"{help_text} (default {defaults[name]})")
    demo.add_argument("--no-picture", action="store_true", help="skip demo.png")
    demo.set_defaults(func=cmd_demo)

    pretrain = commands.add_parser("pretrain", help="pre-train (MLM, ITM, detection, captioning); torchrun-ready")
    _config_arguments(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)

    finetune = commands.add_parser("finetune", help="fine-tune on VQA v2, NLVR2, captioning or retrieval")
    finetune.add_argument("task", choices=FINETUNE_TASKS)
    _config_arguments(finetune)
    finetune.set_defaults(func=cmd_finetune)

    evaluate = commands.add_parser("evaluate", help="score a checkpoint on a task's val or test split")
    evaluate.add_argument("task", choices=EVALUATE_TASKS)
    evaluate.add_argument("--checkpoint", required=True, metavar="DIR",
                          help="a model folder or a run folder (its final/, else its latest step-*)")
    evaluate.add_argument("--split", default="val", choices=["val", "test"],
                          help="the split to score: data.val or data.test (captioning, retrieval: the Karpathy "
                               "data.val_split / data.test_split) (default %(default)s)")
    _config_arguments(evaluate, required=False,
                      help="run config (YAML; see configs/); default: the run_config.yaml exported with the "
                           "checkpoint (<run>/final/)")
    evaluate.set_defaults(func=cmd_evaluate)

    data = commands.add_parser("data", help="check a run config's data before training")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="decode every image file a task's split reads, in parallel, "
                                                   "and list the bad ones (exit status 1 if any)")
    check.add_argument("task", choices=("pretrain", *FINETUNE_TASKS))
    check.add_argument("--split", default="train", choices=["train", "val", "test"],
                       help="the split to check (default %(default)s)")
    check.add_argument("--workers", type=int, default=None, metavar="N",
                       help="decoding threads (default: the machine's cores)")
    _config_arguments(check)
    check.set_defaults(func=cmd_data_check)

    caption = commands.add_parser("caption", help="caption image files with a trained model")
    caption.add_argument("images", nargs="+", metavar="IMAGE")
    caption.add_argument("--checkpoint", required=True, metavar="DIR",
                         help="a pre-training or captioning model folder, or a run folder (its final/, else its "
                              "latest step-*)")
    caption.add_argument("--tokenizer", default=None, metavar="DIR",
                         help="tokenizer folder (default: the one saved with the checkpoint)")
    caption.add_argument("--num-beams", type=int, default=3, metavar="N",
                         help="beam width; 1 is greedy decoding (default %(default)s)")
    caption.add_argument("--max-length", type=int, default=None, metavar="TOKENS",
                         help="longest caption in tokens, [SEP] included (default: the model's "
                              "max_caption_length - 1)")
    caption.add_argument("--image-size", type=int, default=None, metavar="PIXELS",
                         help="shorter side of the model's input (default: the run's data.image.eval, else the "
                              "preset's: 80 tiny, 800 otherwise)")
    caption.add_argument("--device", default=None, metavar="DEVICE",
                         help="where the model runs: cpu, cuda, cuda:1, ... (default: cuda when visible, else cpu)")
    caption.set_defaults(func=cmd_caption)
