"""Batched linear sum assignment: e2evlp (CPU, CUDA) vs scipy's per-image loop, lap and torch-linear-assignment.

DETR-shaped problems: B images, N queries (rows), M targets (columns) fixed or drawn per image from
U[0, 50] (padded to 50, with num_cols). On CUDA inputs the scipy loop pays its device-to-host copy,
as DETR's matcher does. Every implementation's total cost is checked against scipy before timing.

    python -m benchmarks.bench_lsap [e2evlp bench options]   (the same as: e2evlp bench lsap ...)
"""

from __future__ import annotations

import sys

import numpy as np
import scipy.optimize
import torch

from benchmarks.common import (
    busy_cores,
    environment,
    make_record,
    missing_module,
    single_threaded,
    skip_note,
    time_interleaved,
)
from e2evlp import cli, ops, reference

BENCH = "lsap"
BASELINE = "scipy-loop"  # the column the Markdown table's speed-ups are relative to
PAD_COST = 1e6  # what peers without padding support see in padded columns


def make_case(batch: int, rows: int, cols: str, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if cols == "U[0,50]":
        num_cols = torch.randint(0, 51, (batch,), generator=gen)
        width = 50
    else:
        width = int(cols)
        num_cols = torch.full((batch,), width)
    cost = torch.rand(batch, rows, width, generator=gen)
    padded = cost.clone()
    padded[torch.arange(width)[None, None, :].expand_as(cost) >= num_cols[:, None, None]] = PAD_COST
    return cost.to(device), padded.to(device), num_cols.to(device), num_cols.tolist()


def totals(cost: torch.Tensor, assignment: torch.Tensor, counts: list[int]) -> np.ndarray:
    cost, assignment = cost.double().cpu().numpy(), assignment.cpu().numpy()
    out = []
    for b, m in enumerate(counts):
        rows = np.flatnonzero((assignment[b] >= 0) & (assignment[b] < m))
        out.append(cost[b, rows, assignment[b, rows]].sum())
    return np.array(out)


def scipy_totals(cost: torch.Tensor, counts: list[int]) -> np.ndarray:
    host = cost.double().cpu().numpy()
    out = []
    for b, m in enumerate(counts):
        r, c = scipy.optimize.linear_sum_assignment(host[b, :, :m])
        out.append(host[b, r, c].sum())
    return np.array(out)


def peers(device: str) -> tuple[dict, list[dict]]:
    """The optional peers that can run here, name -> fn(cost, padded, num_cols, counts), and skip notes for the rest."""
    found, skipped = {}, []
    why = missing_module("lap", "lap") if device == "cpu" else "a host solver: timed with --device cpu"
    if why:
        skipped.append(skip_note(BENCH, "lap", why))
    else:
        import lap

        def lap_loop(cost, padded, num_cols, counts):
            host = cost.double().cpu().numpy()
            out = np.full(cost.shape[:2], -1, dtype=np.int64)
            for b, m in enumerate(counts):
                if m:
                    _, x, _ = lap.lapjv(host[b, :, :m], extend_cost=True)
                    out[b] = x
            return torch.from_numpy(out)

        found["lap"] = lap_loop
    why = missing_module("torch_linear_assignment", "torch-linear-assignment") if device == "cuda" else "CUDA only"
    if why:
        skipped.append(skip_note(BENCH, "torch-linear-assignment", why))
    else:
        from torch_linear_assignment import batch_linear_assignment

        found["torch-linear-assignment"] = lambda cost, padded, num_cols, counts: batch_linear_assignment(padded)
    return found, skipped


def cases(device: str, quick: bool) -> list[tuple[int, int, str]]:
    """(batch, rows, cols) per case; the quick GPU set keeps the batch sweep that shows the solver's scaling."""
    if not quick:
        batches, shapes = [1, 8, 64, 256], [(100, "U[0,50]"), (100, "100"), (300, "U[0,50]"), (300, "100")]
    elif device == "cuda":
        batches, shapes = [1, 64, 256], [(100, "U[0,50]"), (100, "100")]
    else:
        batches, shapes = [1, 8, 64], [(100, "U[0,50]")]
    return [(batch, rows, cols) for rows, cols in shapes for batch in batches]


def busy_cases(quick: bool) -> list[tuple[int, int, str]]:
    """The CPU cases also timed with every core but one kept busy by another process."""
    return [(batch, 100, "U[0,50]") for batch in ((8, 64) if quick else (8, 64, 256))]


def run(device: str, quick: bool, repeat: int | None = None) -> tuple[list[dict], list[dict]]:
    """Times every implementation on every case (on the CPU beside e2evlp on one thread, and again with busy
    cores); returns the records and the skip notes."""
    env = environment()
    repeat = repeat or (5 if quick else 15)
    impls = {
        "e2evlp": lambda c, p, n, k: ops.linear_sum_assignment(c, num_cols=n),
        "scipy-loop": lambda c, p, n, k: reference.linear_sum_assignment(c, num_cols=k),
    }
    found, skipped = peers(device)
    impls.update(found)
    if device == "cpu":
        impls["e2evlp-1-thread"] = lambda c, p, n, k: single_threaded(lambda: impls["e2evlp"](c, p, n, k))()
    records = []
    for batch, rows, cols in cases(device, quick):
        records += _time_case(impls, batch, rows, cols, device, repeat, env)
    if device == "cpu":
        with busy_cores() as busy:
            for batch, rows, cols in busy_cases(quick):
                records += _time_case(impls, batch, rows, cols, device, repeat, env, suffix=f" busy={busy}")
    return records, skipped


def _time_case(impls: dict, batch: int, rows: int, cols: str, device: str, repeat: int, env: dict,
               suffix: str = "") -> list[dict]:
    """Checks every implementation's total cost against scipy's, then times them interleaved."""
    cost, padded, num_cols, counts = make_case(batch, rows, cols, device)
    expected = scipy_totals(cost, counts)
    for name, fn in impls.items():
        got = totals(cost, fn(cost, padded, num_cols, counts), counts)
        if not np.allclose(got, expected, rtol=1e-6, atol=1e-6):
            raise AssertionError(f"{name} is not optimal on B={batch} N={rows} M={cols}")
    timing = time_interleaved({n: (lambda f=f: f(cost, padded, num_cols, counts)) for n, f in impls.items()},
                              device, warmup=2, repeat=repeat)
    case = f"B={batch} N={rows} M={'~' + cols if cols.startswith('U') else cols}{suffix}"
    return [make_record(BENCH, name, case, t, device=device, dtype="float32", env=env) for name, t in timing.items()]


if __name__ == "__main__":
    sys.exit(cli.main(["bench", "lsap", *sys.argv[1:]]))
