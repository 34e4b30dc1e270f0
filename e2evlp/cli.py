"""The `e2evlp` command (also `python -m e2evlp`)."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

from e2evlp.commands import add_commands


def environment_info() -> dict:
    """Versions, the extension's build, the visible GPUs and the attention backend per device."""
    import torch

    from e2evlp import __version__, _ext
    from e2evlp.ops.dispatch import attention_backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_gb": round(props.total_memory / 2**30, 1)})
    backends = {"cpu": attention_backend("cpu")}
    if gpus:
        backends["cuda"] = attention_backend("cuda")
    return {
        "e2evlp": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "nvcc": shutil.which("nvcc"),
        "extension": _ext.build_info(),
        "gpus": gpus,
        "attention_backend": backends,
    }


def _print_info(info: dict) -> None:
    ext = info["extension"]
    if ext["built"]:
        archs = ", ".join(f"sm_{a.replace('.', '').replace('+PTX', '')}" for a in ext["archs"]) or "none"
        ext_line = f"built with CUDA kernels for {archs}" if ext["with_cuda"] else "built, CPU kernels only"
    else:
        ext_line = f"NOT usable: {ext['reason']}"
    gpus = "; ".join(f"{g['name']} (sm_{g['capability'].replace('.', '')}, {g['memory_gb']} GiB)"
                     for g in info["gpus"]) or "none visible"
    rows = [
        ("e2evlp", info["e2evlp"]),
        ("python", info["python"]),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU build'})"),
        ("triton", info["triton"] or "not installed"),
        ("nvcc", info["nvcc"] or "not on PATH"),
        ("e2evlp._C", ext_line),
        ("GPU", gpus),
        ("attention", ", ".join(f"{dev} -> {name}" for dev, name in info["attention_backend"].items())),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_info(args: argparse.Namespace) -> int:
    info = environment_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


# In run order; each is the script benchmarks/bench_<name>.py of a source checkout (benchmarks/suite.py runs them).
BENCHMARKS = ("lsap", "matcher", "boxes", "attention", "train-step")


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs the checkout's benchmark suite (benchmarks/ ships with the source, not the wheel)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "suite.py").is_file():
        print("e2evlp bench runs the scripts in a source checkout's benchmarks/ folder, and none is beside this "
              f"installation ({root}); clone the repository and run it from there.", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.suite import run_command

    return run_command(args)


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_kernels_inspect(args: argparse.Namespace) -> int:
    """Compiles the attention kernels' autotune candidates for --arch with Triton's real compiler (no GPU needed)
    and prints registers, spills, shared memory and Hopper instructions per candidate."""
    import os

    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter compiles nothing
    from e2evlp.kernels import attention_inspect as AI

    features = AI.SWEEP_FEATURES if args.features == "sweep" else tuple(args.features.split(","))
    causal_modes = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    if args.update_spill_table and (features != AI.SWEEP_FEATURES or sorted(args.head_dim) != list(AI.HEAD_DIMS)
                                    or args.dtype != "bf16" or args.causal != "both" or args.passes != "all"):
        raise ValueError("--update-spill-table takes the whole sweep: --features sweep, every head dim, "
                         "--dtype bf16, --causal both, --passes all")
    passes = AI.PASSES if args.passes == "all" else tuple(args.passes.split(","))
    records = AI.inspect(args.arch, args.head_dim, args.dtype, causal_modes, features, passes,
                         fallbacks=not args.offered_only, workers=args.workers)
    if args.update_spill_table:
        AI.update_spill_table([record.as_json() for record in records])
    rows = [record.as_json() for record in records]
    if args.offered_only:
        keep = [row["offered"] for row in rows]
        records = [record for record, kept in zip(records, keep) if kept]
        rows = [row for row, kept in zip(rows, keep) if kept]
    print(AI.table(records))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    bad = AI.spilling_offers(rows)
    for row in bad:
        print(f"OFFERED AND SPILLING: {row['pass']} {row['block_m']}x{row['block_n']} {row['num_warps']} warps "
              f"{row['num_stages']} stages, D={row['head_dim']} causal={row['causal']} {row['features']}: "
              f"{row['spill_bytes']} B", file=sys.stderr)
    return 1 if bad and args.check else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e2evlp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, the extension's build, GPUs, attention backend")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=cmd_info)
    add_commands(commands)
    bench = commands.add_parser("bench", help="run the benchmarks (from a source checkout)")
    bench.add_argument("name", choices=[*BENCHMARKS, "all"])
    bench.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                       help="all (default): the CPU, then the GPU when one is visible")
    bench.add_argument("--quick", action="store_true", help="the small cases (minutes on a CPU; make gpu-check's set)")
    bench.add_argument("--repeat", type=int, default=None, help="timed calls per implementation and case")
    bench.add_argument("--out", default=None, metavar="DIR",
                       help="results folder (default $E2EVLP_RESULTS_DIR, else benchmarks/results)")
    bench.add_argument("--json", default=None, metavar="FILE", help="write this run's records and skips as JSON")
    bench.add_argument("--markdown", default=None, metavar="FILE", help="write this run's tables as Markdown")
    bench.add_argument("--plot", default=None, metavar="FILE", help="plot this run's size sweeps (needs matplotlib)")
    bench.set_defaults(func=cmd_bench)
    kernels = commands.add_parser("kernels", help="compiled evidence for the Triton kernels (no GPU needed)")
    kernel_commands = kernels.add_subparsers(dest="kernels_command", required=True)
    inspect = kernel_commands.add_parser("inspect", help=cmd_kernels_inspect.__doc__.split("\n")[0],
                                         description=cmd_kernels_inspect.__doc__)
    inspect.add_argument("--arch", type=int, required=True, choices=[80, 90], help="target: sm_80 or sm_90")
    inspect.add_argument("--head-dim", type=_int_list, default=[32, 64, 80, 96, 128], metavar="D,D",
                         help="head dims (default 32,64,80,96,128)")
    inspect.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="default bf16")
    inspect.add_argument("--causal", default="both", choices=["both", "yes", "no"], help="default both")
    inspect.add_argument("--features", default="kpm", metavar="SET,SET",
                         help="feature sets: plain, kpm (key padding: the padded batch; default), kpm-dropout, mask, "
                              "varlen, varlen-dropout; or sweep (those the spill table is made of)")
    inspect.add_argument("--passes", default="all", metavar="PASS,PASS", help="fwd, delta, dkdv, dq (default all)")
    inspect.add_argument("--offered-only", action="store_true",
                         help="only the candidates the autotuner on that arch would try (no fallbacks)")
    inspect.add_argument("--json", default=None, metavar="FILE", help="also write the records as a JSON list")
    inspect.add_argument("--workers", type=int, default=None, metavar="N", help="compiling processes (default: cores)")
    inspect.add_argument("--check", action="store_true", help="exit status 1 if an offered candidate spills")
    inspect.add_argument("--update-spill-table", action="store_true",
                         help="rewrite this arch's entry of kernels/attention_spills.json (needs the whole sweep)")
    inspect.set_defaults(func=cmd_kernels_inspect)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The subcommand's parser, whose usage line an error about its arguments should show (else `parser`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(getattr(args, "command", None), parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = _command_parser(parser, args)
    # key=value overrides may follow --config; argparse leaves those after an option unparsed.
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: a config, a path, a value (exit status 2)
        command.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
