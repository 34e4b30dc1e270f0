"""Shared benchmark plumbing: interleaved timing with warm-up and device sync, records, skip notes, tables, files."""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from e2evlp.devices import device_name  # noqa: F401  (re-exported for the scripts)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("E2EVLP_COMMIT")  # set by callers whose copy of the tree has no .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = None
    return {"torch": torch.__version__, "triton": triton_version, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MIN_SAMPLE_MS = 0.5
MAX_CALLS_PER_SAMPLE = 100


def _calls_per_sample(fn: Callable[[], object], device: torch.device) -> int:
    """How many back-to-back calls of `fn` make one timed sample: enough to last MIN_SAMPLE_MS on a GPU."""
    if device.type != "cuda":
        return 1
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _sync(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_MS / one)))


def _spin(stop) -> None:
    while not stop.is_set():
        pass


@contextlib.contextmanager
def busy_cores(count: int | None = None):
    """Within the block, `count` processes (default: one per core but one) each keep a core busy, as a training
    job's data-loader workers do: CPU code that splits its work across threads is timed the way it runs."""
    count = max(0, (os.cpu_count() or 1) - 1) if count is None else count
    stop = multiprocessing.get_context("spawn").Event()
    spinners = [multiprocessing.get_context("spawn").Process(target=_spin, args=(stop,), daemon=True)
                for _ in range(count)]
    for spinner in spinners:
        spinner.start()
    try:
        yield count
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join(timeout=10)


def single_threaded(fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with torch's intra-op threads set to 1: the baseline a parallel CPU path must never fall below."""
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)
    return run


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str, *, warmup: int = 3,
                     repeat: int = 20, min_time_s: float = 0.0) -> dict[str, dict]:
    """Times each callable `repeat` times, round-robin so that all see the same machine state.

    Each sample is timed with a device synchronization before and after (CUDA events on a GPU, a host
    clock otherwise). On a GPU a call shorter than MIN_SAMPLE_MS is repeated back to back within one sample
    (the sample is their mean), so that its launches overlap its kernels as in a real step rather than
    timing the host alone. Returns {name: {"ms", "ms_min", "ms_max", "peak_mem_mb"}} (median ms).
    """
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    calls = {name: _calls_per_sample(fn, device) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float | None] = {name: None for name in fns}
    start_all = time.perf_counter()
    rounds = 0
    while rounds < repeat or time.perf_counter() - start_all < min_time_s:
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                _sync(device)
                start.record()
                for _ in range(calls[name]):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / calls[name])
                peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                peaks[name] = max(peaks[name] or 0.0, peak)
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: {"ms": statistics.median(s), "ms_min": min(s), "ms_max": max(s), "peak_mem_mb": peaks[name]}
            for name, s in samples.items()}


def make_record(bench: str, impl: str, case: str, timing: dict, *, device: torch.device | str, dtype: str,
                pass_: str | None = None, tflops: float | None = None, env: dict | None = None, **extra) -> dict:
    record = {"bench": bench, "impl": impl, "case": case, "pass": pass_, "dtype": dtype,
              "device": device_name(device), "ms": round(timing["ms"], 5), "ms_min": round(timing["ms_min"], 5),
              "ms_max": round(timing["ms_max"], 5), "tflops": tflops,
              "peak_mem_mb": None if timing.get("peak_mem_mb") is None else round(timing["peak_mem_mb"], 2)}
    record.update(env or environment())
    record.update(extra)
    return record


def read_records(path: Path | str) -> list[dict]:
    """Records from a results file: a list of records, or {"records": [...]}."""
    data = json.loads(Path(path).read_text())
    return data["records"] if isinstance(data, dict) else data


def write_text(path: Path | str, text: str) -> Path:
    """Writes atomically (a temporary file, then a rename), so a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: Path | str, records: list[dict], skipped: list[dict] | None = None) -> Path:
    data = {"records": records} if skipped is None else {"records": records, "skipped": skipped}
    return write_text(path, json.dumps(data, indent=1) + "\n")


def skip_note(bench: str, impl: str, why: str, case: str | None = None) -> dict:
    """An implementation that did not run, and why (printed and kept beside the records, never timed)."""
    return {"bench": bench, "impl": impl, "case": case, "why": why}


def missing_module(module: str, package: str) -> str | None:
    """Why a peer cannot run when its module is not importable, else None."""
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install {package})"
    return None


def markdown_table(records: list[dict], baseline: str | tuple[str, ...] = ()) -> str:
    """One row per case, one column per implementation (median ms), plus each one's speed-up over the
    baseline: the first of `baseline` that ran, else the last implementation."""
    impls = list(dict.fromkeys(r["impl"] for r in records))
    cases = list(dict.fromkeys((r["case"], r["pass"], r["device"]) for r in records))
    candidates = (baseline,) if isinstance(baseline, str) else baseline
    baseline = next((name for name in candidates if name in impls), impls[-1])
    others = [i for i in impls if i != baseline]
    header = ["case", "device"] + [f"{i} ms" for i in impls] + [f"{i} vs {baseline}" for i in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_key = {(r["case"], r["pass"], r["device"], r["impl"]): r for r in records}
    for case, pass_, device in cases:
        row = [case + (f" {pass_}" if pass_ else ""), device]
        times = {i: by_key.get((case, pass_, device, i), {}).get("ms") for i in impls}
        row += [f"{times[i]:.3f}" if times[i] is not None else "—" for i in impls]
        for i in others:
            ok = times[i] is not None and times[baseline] is not None
            row.append(f"{times[baseline] / times[i]:.2f}x" if ok else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
