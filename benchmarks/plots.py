"""Plots of benchmark records: ms against batch size (LSAP, matcher, boxes), TFLOP/s against length (attention).

One figure, one panel per benchmark, case family and pass, one line per implementation (the same colour in
every panel). A case family is the case string less the sizes that vary along the x axis, so the records
written before this module (benchmarks/results/*.json) plot as well as new ones.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

# bench -> (x size, y field, sizes left out of the family's name, cases plotted: those starting with this)
AXES = {
    "lsap": ("B", "ms", ("B",), ""),
    "matcher": ("B", "ms", ("B",), ""),
    "boxes": ("B", "ms", ("B", "P"), ""),
    "attention": ("L", "tflops", ("B", "H", "L"), "sweep"),
}
LABELS = {"B": "batch size", "L": "sequence length", "ms": "median ms (log)", "tflops": "TFLOP/s"}


def size(case: str, name: str) -> int | None:
    found = re.search(rf"\b{name}=(\d+)\b", case)
    return int(found.group(1)) if found else None


def family(case: str, sizes: tuple[str, ...]) -> str:
    return re.sub(rf"\s*\b({'|'.join(sizes)})=\d+\b", "", case).strip()


def panels(records: list[dict]) -> dict[tuple, dict[str, list[tuple[float, float]]]]:
    """{(device, bench, family, pass): {impl: [(x, y), ...] sorted by x}} for the families with two sizes or more."""
    found: dict[tuple, dict[str, list]] = {}
    for r in records:
        if r["bench"] not in AXES:
            continue
        x_name, y_name, sizes, prefix = AXES[r["bench"]]
        x = size(r["case"], x_name)
        if x is None or r.get(y_name) is None or not r["case"].startswith(prefix):
            continue
        key = (r["device"], r["bench"], family(r["case"], sizes), r["pass"])
        found.setdefault(key, {}).setdefault(r["impl"], []).append((x, r[y_name]))
    return {key: {impl: sorted(points) for impl, points in lines.items()} for key, lines in found.items()
            if len({x for points in lines.values() for x, _ in points}) > 1}


def plot_records(records: list[dict], path: Path | str, title: str) -> bool:
    """Draws every plottable family of `records` into `path`; False (and no file) when there is none."""
    import matplotlib

    matplotlib.use("Agg")  # benchmark hosts have no display
    import matplotlib.pyplot as plt

    found = panels(records)
    if not found:
        return False
    impls = list(dict.fromkeys(r["impl"] for r in records))
    several_devices = len({key[0] for key in found}) > 1
    cols = min(4, len(found))
    rows = math.ceil(len(found) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(found):]:
        ax.set_visible(False)
    for ax, ((device, bench, name, pass_), lines) in zip(axes.flat, found.items()):
        x_name, y_name, _, _ = AXES[bench]
        for impl, points in lines.items():
            ax.plot(*zip(*points), marker="o", label=impl, color=f"C{impls.index(impl) % 10}")
        ax.set_xscale("log", base=2)
        if y_name == "ms":
            ax.set_yscale("log")
        ax.set_xlabel(LABELS[x_name])
        ax.set_ylabel(LABELS[y_name])
        ax.set_title(f"{bench} {name}" + (f" {pass_}" if pass_ else "") + (f"\n{device}" if several_devices else ""),
                     fontsize="small")
        ax.legend(fontsize="x-small")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("\n".join(textwrap.wrap(title, 40 * cols)), fontsize="medium")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
