"""`e2evlp bench`: runs the benchmark scripts, prints e2evlp against its best peer, writes JSON, Markdown and a plot.

Every script exposes run(device, quick, repeat) -> (records, skip notes), BENCH (the records' "bench") and
BASELINE (the column its Markdown table's speed-ups are relative to). Each script's records are merged into
<results>/<device>-<date>[-quick].json as soon as it finishes (with a Markdown table and, when matplotlib is
installed, a plot beside it), so a run cut short keeps what it measured; --json, --markdown and --plot write
this run's records to the files named.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, markdown_table, read_records, skip_note, write_json, write_text
from e2evlp.cli import BENCHMARKS

MODULES = {name: f"benchmarks.bench_{name.replace('-', '_')}" for name in BENCHMARKS}  # the CLI's names, in run order
THROUGHPUT = ("samples_per_s", "tokens_per_s", "mfu")  # what the train step records beside its time


def module_of(bench: str):
    """The script that writes records with this "bench" (train_step ↔ train-step)."""
    return importlib.import_module(MODULES[bench.replace("_", "-")])


def results_dir(out: str | None) -> Path:
    return Path(out or os.environ.get("E2EVLP_RESULTS_DIR") or RESULTS_DIR)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _timed(record: dict | None) -> str:
    """median ms and, where recorded, the fastest and slowest sample: "0.210 (0.205–0.230)"."""
    if record is None:
        return "—"
    if record.get("ms_min") is None or record.get("ms_max") is None:
        return f"{record['ms']:.3f}"
    return f"{record['ms']:.3f} ({record['ms_min']:.3f}–{record['ms_max']:.3f})"


def within_noise(ours: dict, peer: dict) -> bool:
    """Whether the two medians differ by less than the wider of the two samples' spreads (max - min): then the
    ratio says more about a noisy machine than about either implementation."""
    spreads = [r["ms_max"] - r["ms_min"] for r in (ours, peer) if r.get("ms_min") is not None
               and r.get("ms_max") is not None]
    return bool(spreads) and abs(ours["ms"] - peer["ms"]) < max(spreads)


def versus_best_peer(records: list[dict]) -> str:
    """Per device, one row per case and pass: the fastest e2evlp implementation against the fastest other one,
    each as median (min–max) ms; a speed-up within the samples' spread is marked "(noise)"."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["device"], r["bench"], r["case"], r["pass"]), []).append(r)
    sections = []
    for device in dict.fromkeys(key[0] for key in groups):
        lines = [f"### {device}", "",
                 "| bench | case | pass | e2evlp ms (min–max) | best peer | peer ms (min–max) | e2evlp speed-up |",
                 "|---|---|---|---|---|---|---|"]
        for (dev, bench, case, pass_), group in groups.items():
            if dev != device:
                continue
            ours = min((r for r in group if r["impl"].startswith("e2evlp")), key=lambda r: r["ms"], default=None)
            peer = min((r for r in group if not r["impl"].startswith("e2evlp")), key=lambda r: r["ms"], default=None)
            which = "" if ours is None or ours["impl"] == "e2evlp" else f" ({ours['impl']})"
            ratio = "—"
            if ours is not None and peer is not None:
                ratio = f"{peer['ms'] / ours['ms']:.2f}x" + (" (noise)" if within_noise(ours, peer) else "")
            lines.append(f"| {bench} | {case} | {pass_ or ''} | {_timed(ours)}{which} | "
                         f"{'—' if peer is None else peer['impl']} | {_timed(peer)} | {ratio} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def throughput(records: list[dict]) -> str:
    """The train step's samples/s, tokens/s, peak memory and MFU, one line per implementation."""
    return "\n".join(f"- {r['impl']} on {r['device']}: " + ", ".join(f"{key} {r[key]}" for key in THROUGHPUT)
                     + f", peak_mem_mb {r['peak_mem_mb']}, tflops {r['tflops']}"
                     for r in records if all(key in r for key in THROUGHPUT))


def bench_tables(records: list[dict]) -> str:
    """A section per benchmark: its Markdown table (every implementation) and the train step's throughput."""
    sections = []
    for bench in dict.fromkeys(r["bench"] for r in records):
        mine = [r for r in records if r["bench"] == bench]
        extra = throughput(mine)
        sections.append(f"### {bench}\n\n{markdown_table(mine, module_of(bench).BASELINE)}"
                        + (f"\n\n{extra}" if extra else ""))
    return "\n\n".join(sections)


def skipped_lines(skipped: list[dict]) -> str:
    """One line per (benchmark, implementation, reason), with the cases it concerns."""
    grouped: dict[tuple, list[str]] = {}
    for note in skipped:
        grouped.setdefault((note["bench"], note["impl"], note["why"]), []).append(note["case"])
    lines = []
    for (bench, impl, why), cases in grouped.items():
        named = [c for c in cases if c]
        where = "" if not named else f" (case {named[0]})" if len(named) == 1 else f" ({len(named)} cases)"
        lines.append(f"- {bench}: {impl} — {why}{where}")
    return "\n".join(lines)


def report(records: list[dict], skipped: list[dict], title: str) -> str:
    parts = [f"# {title}", "## e2evlp vs the best peer", versus_best_peer(records) if records else "No records.",
             "## Every implementation (median ms)", bench_tables(records)]
    if skipped:
        parts += ["## Skipped", skipped_lines(skipped)]
    return "\n\n".join(parts) + "\n"


def title_of(records: list[dict], what: str, quick: bool) -> str:
    if not records:
        return f"e2evlp bench {what}"
    def each(key: str, chars: int | None = None) -> str:  # a file of the day may hold records of several runs
        return ", ".join(dict.fromkeys(str(r[key])[:chars] for r in records))

    return (f"e2evlp bench {what}{' --quick' if quick else ''}: {each('device')}; torch {each('torch')}, "
            f"triton {each('triton')}, commit {each('commit')}, {each('date', 10)}")


def save_dated(records: list[dict], out_dir: Path, quick: bool) -> list[Path]:
    """Merges records into their device's file for their date; a rerun replaces the records of the same case."""
    written = []
    for device, date in dict.fromkeys((r["device"], r["date"][:10]) for r in records):
        path = out_dir / f"{slug(device)}-{date}{'-quick' if quick else ''}.json"
        old = read_records(path) if path.is_file() else []
        merged = {(r["bench"], r["impl"], r["case"], r["pass"], r["dtype"]): r
                  for r in old + [r for r in records if (r["device"], r["date"][:10]) == (device, date)]}
        mine = list(merged.values())
        write_json(path, mine)
        write_text(path.with_suffix(".md"), report(mine, [], title_of(mine, "results", quick)))
        if importlib.util.find_spec("matplotlib") is not None:
            from benchmarks.plots import plot_records

            plot_records(mine, path.with_suffix(".png"), title_of(mine, "results", quick))
        written.append(path)
    return written


def devices_for(choice: str) -> tuple[list[str], list[dict]]:
    if choice != "all":
        return [choice], []
    if torch.cuda.is_available():
        return ["cpu", "cuda"], []
    return ["cpu"], [skip_note("every benchmark", "the CUDA run", "no GPU visible")]


def run_command(args: argparse.Namespace) -> int:
    """`e2evlp bench NAME`: args has name, device, quick, repeat, out, json, markdown and plot."""
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("e2evlp bench --plot needs matplotlib, which is not installed: pip install matplotlib "
              "(or pip install -e '.[bench]')", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("e2evlp bench --device cuda: no GPU is visible", file=sys.stderr)
        return 2
    names = list(MODULES) if args.name == "all" else [args.name]
    devices, skipped = devices_for(args.device)
    out_dir = results_dir(args.out)
    records, failed = [], []
    for device in devices:
        for name in names:
            print(f"== {name} on {device}", flush=True)
            start = time.perf_counter()
            try:
                module = importlib.import_module(MODULES[name])
                mine, notes = module.run(device, args.quick, args.repeat)
            except Exception:  # one broken benchmark must not cost the others' figures
                traceback.print_exc()
                failed.append(f"{name} on {device}")
                continue
            print(markdown_table(mine, module.BASELINE))
            if throughput(mine):
                print(throughput(mine))
            for path in save_dated(mine, out_dir, args.quick):
                print(f"wrote {path} ({time.perf_counter() - start:.0f} s)", flush=True)
            records += mine
            skipped += notes
    title = title_of(records, args.name, args.quick)
    print(f"\n{title}\n\n{versus_best_peer(records)}")
    if skipped:
        print(f"\nSkipped:\n{skipped_lines(skipped)}")
    if args.json:
        print(f"wrote {write_json(args.json, records, skipped)}")
    if args.markdown:
        print(f"wrote {write_text(args.markdown, report(records, skipped, title))}")
    if args.plot:
        from benchmarks.plots import plot_records

        print(f"wrote {args.plot}" if plot_records(records, args.plot, title) else "--plot: no case sweeps a size")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
