"""The command line's lists and defaults come from their sources: the benchmark scripts and DemoConfig."""

from dataclasses import fields
from pathlib import Path

from e2evlp import cli
from e2evlp.commands import DEMO_OPTIONS
from e2evlp.demo_config import DemoConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_script_has_a_name_and_every_name_a_script():
    scripts = {path.stem.removeprefix("bench_").replace("_", "-") for path in (ROOT / "benchmarks").glob("bench_*.py")}
    assert set(cli.BENCHMARKS) == scripts


def test_the_suite_runs_the_commands_benchmarks_in_order():
    from benchmarks.suite import MODULES

    assert list(MODULES) == list(cli.BENCHMARKS)


def test_demo_options_default_to_demo_config():
    args = cli.build_parser().parse_args(["demo"])
    defaults = {field.name: field.default for field in fields(DemoConfig)}
    assert {name: getattr(args, name) for name in DEMO_OPTIONS} == {name: defaults[name] for name in DEMO_OPTIONS}
    bench = cli.build_parser().parse_args(["bench", cli.BENCHMARKS[-1]])
    assert bench.name == cli.BENCHMARKS[-1]
