"""Decoding every image a data set reads, before training: the bad files are found at once, not mid-run."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from .readers_base import DataError, load_image

# Record fields that name an image file, over the readers' record types (NLVR2 has two per record).
IMAGE_FIELDS = ("image_path", "left_path", "right_path")


def image_files(records: Iterable) -> list[Path]:
    """Every image file the records name, each once, in the order first named."""
    files: dict[Path, None] = {}
    for record in records:
        for field in IMAGE_FIELDS:
            path = getattr(record, field, None)
            if path is not None:
                files[Path(path)] = None
    return list(files)


def _problem(path: Path) -> str | None:
    try:
        load_image(path)
    except DataError as err:
        return str(err)
    return None


def bad_images(paths: Sequence[Path], workers: int | None = None, progress: bool = True) -> list[tuple[Path, str]]:
    """(file, what is wrong) for each file that is missing or does not decode fully, in the order of `paths`.

    Threads take one file at a time (PIL decodes without holding the GIL), so a busy core slows the check by
    its own share only; `workers` defaults to the machine's core count."""
    workers = max(1, workers or os.cpu_count() or 1)
    problems: dict[Path, str] = {}
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(paths), desc="images", unit="file",
                                                   disable=not progress) as bar:
        futures = {pool.submit(_problem, path): path for path in paths}
        for future in as_completed(futures):
            problem = future.result()
            if problem is not None:
                problems[futures[future]] = problem
            bar.update(1)
    return [(path, problems[path]) for path in paths if path in problems]
