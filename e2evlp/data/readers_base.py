"""Shared pieces of the dataset readers: DataError, image loading, JSON loading and the bad-record policy."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

log = logging.getLogger("e2evlp.data")

T = TypeVar("T")
R = TypeVar("R")

# Keys that identify a record in error messages, in order of preference.
_ID_KEYS = ("question_id", "identifier", "image_id", "imgid", "id", "object_id")


class DataError(ValueError):
    """Bad input data; the message names the file and the record."""


class BadRecord(Exception):
    """One record is unusable; the reader turns it into a DataError or a counted skip."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # short and bounded: the key of the skipped counter


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, raising DataError naming the file when it is missing or unreadable."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            # convert() decodes every pixel, so truncated files fail here rather than later in a worker.
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file not found") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot decode image ({err})") from err


def read_json(path: str | Path) -> Any:
    """Load a whole JSON file, raising DataError naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from err


def top_level(data: Any, path: Path, key: str | None = None, kind: type = list) -> Any:
    """Return data (or data[key]) after checking its JSON type; a wrong shape makes the whole file unusable."""
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"{path}: expected a JSON object with a {key!r} field")
        data = data[key]
    if not isinstance(data, kind):
        raise DataError(f"{path}: expected a JSON {kind.__name__} {f'under {key!r}' if key else 'at top level'}")
    return data


def field(item: Any, key: str) -> Any:
    if not isinstance(item, dict):
        raise BadRecord("not a JSON object")
    if key not in item:
        raise BadRecord(f"missing field {key!r}")
    return item[key]


def int_field(item: Any, key: str) -> int:
    value = field(item, key)
    # bool is an int subclass; a true/false id is a data error, not 1/0.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRecord(f"field {key!r} is not an integer", repr(value))
    return value


def number_field(item: Any, key: str) -> float:
    value = field(item, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord(f"field {key!r} is not a number", repr(value))
    return float(value)


def str_field(item: Any, key: str) -> str:
    value = field(item, key)
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} is not a string", repr(value))
    return value


def list_field(item: Any, key: str) -> list:
    value = field(item, key)
    if not isinstance(value, list):
        raise BadRecord(f"field {key!r} is not a list")
    return value


def image_size(item: Any) -> tuple[int, int]:
    """(width, height) of an image entry; both must be positive to normalize boxes by them."""
    width, height = int_field(item, "width"), int_field(item, "height")
    if width <= 0 or height <= 0:
        raise BadRecord("image size not positive", f"{width}x{height}")
    return width, height


def xywh_to_cxcywh(x: float, y: float, w: float, h: float, width: int, height: int) -> list[float] | None:
    """Absolute top-left xywh → normalized cxcywh, clipped to the image; None for a box with no area left."""
    # Clip like DETR's COCO loader: annotations slightly outside the image are common.
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        return None
    return [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]


def record_label(item: Any, index: int) -> str:
    """'#index (key=value)' for error messages, using the record's id when it has one."""
    for key in _ID_KEYS:
        value = item.get(key) if isinstance(item, dict) else getattr(item, key, None)
        if value is not None:
            return f"#{index} ({key}={value!r})"
    return f"#{index}"


class Reader:
    """Base of every reader: applies the bad-record policy and counts what it skips or drops."""

    def __init__(self, *, check_images: bool = False, skip_bad: bool = False) -> None:
        self.check_images = check_images
        self.skip_bad = skip_bad
        # reason → count of records skipped as bad (only with skip_bad=True).
        self.skipped: Counter[str] = Counter()
        # reason → count of valid items left out by design (crowd boxes, out-of-vocabulary objects, …).
        self.dropped: Counter[str] = Counter()

    def bad(self, path: Path, label: str, err: BadRecord) -> None:
        """Raise DataError, or with skip_bad count the skip and log the first one of each reason."""
        message = f"{path}: record {label}: {err}"
        if not self.skip_bad:
            raise DataError(message) from err
        if err.reason not in self.skipped:
            log.warning("skipping bad record (%s); further ones with this reason are only counted", message)
        self.skipped[err.reason] += 1

    def parse_all(self, path: Path, items: Iterable[T], parse: Callable[[T], R]) -> list[R]:
        """parse() every item; a BadRecord from one item goes through the bad-record policy."""
        results = []
        for index, item in enumerate(items):
            try:
                results.append(parse(item))
            except BadRecord as err:
                self.bad(path, record_label(item, index), err)
        return results

    def readable(self, path: Path, records: list[R], image_paths: Callable[[R], list[Path]]) -> list[R]:
        """With check_images, keep only records whose image files all decode; others go through bad()."""
        if not self.check_images:
            return records
        good: set[Path] = set()  # several records (VQA questions) share an image: decode it once

        def check(record: R) -> R:
            for image_path in image_paths(record):
                if image_path in good:
                    continue
                try:
                    load_image(image_path)
                except DataError as err:
                    kind = "corrupt image file" if image_path.exists() else "missing image file"
                    raise BadRecord(kind, str(err)) from err
                good.add(image_path)
            return record

        return self.parse_all(path, records, check)
