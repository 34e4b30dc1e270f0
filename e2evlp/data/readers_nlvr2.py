"""Reader for NLVR2 JSON-lines files and their image pairs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .readers_base import BadRecord, DataError, Reader, str_field

_LABELS = {"True": True, "False": False}


@dataclass
class NLVR2Record:
    identifier: str
    sentence: str
    left_path: Path
    right_path: Path
    label: bool | None  # None for unlabeled (hidden test) examples


def _image_paths(image_root: Path, identifier: str, directory: str | None = None) -> tuple[Path, Path]:
    """The two image files of an example: "dev-850-0-0" → dev-850-0-img0.png and dev-850-0-img1.png."""
    pair, sep, _ = identifier.rpartition("-")
    if not sep or not pair:
        raise BadRecord("identifier has no '-k' suffix", repr(identifier))
    # The train split spreads its images over numbered folders named by the record's "directory".
    folder = image_root / directory if directory is not None else image_root
    return folder / f"{pair}-img0.png", folder / f"{pair}-img1.png"


class NLVR2Reader(Reader):
    """Reads an NLVR2 .jsonl file; a malformed line is a bad record like any other."""

    def __init__(self, image_root: str | Path, *, check_images: bool = False, skip_bad: bool = False) -> None:
        super().__init__(check_images=check_images, skip_bad=skip_bad)
        self.image_root = Path(image_root)

    def read(self, jsonl_file: str | Path) -> list[NLVR2Record]:
        path = Path(jsonl_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (FileNotFoundError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read ({err})") from err
        # Blank lines (a trailing newline) are not records; keep line numbers for the messages.
        numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
        records = self.parse_all(path, numbered, self._parse)
        return self.readable(path, records, lambda r: [r.left_path, r.right_path])

    def _parse(self, numbered: tuple[int, str]) -> NLVR2Record:
        line_number, line = numbered
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadRecord("malformed JSON", f"line {line_number}: {err.msg}") from err
        identifier, sentence = str_field(item, "identifier"), str_field(item, "sentence")
        label = item.get("label")
        if label is not None and label not in _LABELS:
            raise BadRecord("label is not 'True' or 'False'", repr(label))
        directory = item.get("directory")
        left, right = _image_paths(self.image_root, identifier, None if directory is None else str(directory))
        return NLVR2Record(identifier, sentence, left, right, None if label is None else _LABELS[label])
