"""Batched linear sum assignment: e2evlp (CPU, CUDA) vs scipy's per-image loop, lap and torch-linear-assignment.

DETR-shaped problems: B images, N queries (rows), M targets (columns) fixed or drawn per image from
U[0, 50] (padded to 50, with num_cols). On CUDA inputs the scipy loop pays its device-to-host copy,
as DETR's matcher does. Every implementation's total cost is checked against scipy before timing.

    python -m benchmarks.bench_lsap [--device cpu|cuda|all] [--quick] [--out DIR]
"""

from __future__ import annotations

import importlib.util

import numpy as np
import scipy.optimize
import torch

from benchmarks.common import (
    bench_arguments,
    environment,
    make_record,
    publish,
    time_interleaved,
)
from e2evlp import ops, reference

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


def peers(device: str) -> dict:
    """Optional peers that are installed: name -> fn(cost, padded, num_cols, counts)."""
    found = {}
    if device == "cpu" and importlib.util.find_spec("lap") is not None:
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
    if device == "cuda" and importlib.util.find_spec("torch_linear_assignment") is not None:
        from torch_linear_assignment import batch_linear_assignment

        def tla(cost, padded, num_cols, counts):
            return batch_linear_assignment(padded)

        found["torch-linear-assignment"] = tla
    return found


def run(device: str, quick: bool, repeat: int) -> list[dict]:
    env = environment()
    batches = [1, 8, 64] if quick else [1, 8, 64, 256]
    shapes = [(100, "U[0,50]")] if quick else [(100, "U[0,50]"), (100, "100"), (300, "U[0,50]"), (300, "100")]
    impls = {
        "e2evlp": lambda c, p, n, k: ops.linear_sum_assignment(c, num_cols=n),
        "scipy-loop": lambda c, p, n, k: reference.linear_sum_assignment(c, num_cols=k),
    }
    impls.update(peers(device))
    records = []
    for rows, cols in shapes:
        for batch in batches:
            cost, padded, num_cols, counts = make_case(batch, rows, cols, device)
            expected = scipy_totals(cost, counts)
            for name, fn in impls.items():
                got = totals(cost, fn(cost, padded, num_cols, counts), counts)
                if not np.allclose(got, expected, rtol=1e-6, atol=1e-6):
                    raise AssertionError(f"{name} is not optimal on B={batch} N={rows} M={cols}")
            timing = time_interleaved({n: (lambda f=f: f(cost, padded, num_cols, counts)) for n, f in impls.items()},
                                      device, warmup=2, repeat=repeat)
            case = f"B={batch} N={rows} M={'~' + cols if cols.startswith('U') else cols}"
            for name, t in timing.items():
                records.append(make_record("lsap", name, case, t, device=device, dtype="float32", env=env))
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    args, devices = bench_arguments(__doc__, "fewer, smaller cases (the demo)", argv)
    repeat = args.repeat or (5 if args.quick else 15)
    records = []
    for device in devices:
        mine = run(device, args.quick, repeat)
        publish(mine, f"lsap-{device}", args.quick, args.out, baseline="scipy-loop")
        records += mine
    return records


if __name__ == "__main__":
    main()
