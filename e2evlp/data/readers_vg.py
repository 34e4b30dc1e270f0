"""Readers for Visual Genome: objects.json + attributes.json (boxes), region_descriptions.json (captions)."""

from __future__ import annotations

from pathlib import Path

from .readers_base import (
    BadRecord,
    DataError,
    Reader,
    image_size,
    int_field,
    list_field,
    number_field,
    read_json,
    str_field,
    top_level,
    xywh_to_cxcywh,
)
from .readers_coco import CaptionRecord, DetectionRecord


def _clean(name: object) -> str:
    # VG names are free text typed by annotators ("Tree ", "WHITE"): compare them case- and space-insensitively.
    return " ".join(str(name).lower().split())


def _first_in(names: list, index: dict[str, int]) -> int:
    """Index of the first name found in the vocabulary, -1 when none is."""
    return next((index[_clean(n)] for n in names if _clean(n) in index), -1)


def _vocab_index(vocab: list[str]) -> dict[str, int]:
    """Name → entry index; an entry may list synonyms separated by commas ("stop sign,stopsign")."""
    return {_clean(name): i for i, entry in enumerate(vocab) for name in entry.split(",") if _clean(name)}


def read_vocab(path: str | Path) -> list[str]:
    """A vocabulary file, one class per line (bottom-up attention's objects_vocab.txt / attributes_vocab.txt
    layout: synonyms separated by commas); blank lines are not classes."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    vocab = [line.strip() for line in lines if line.strip()]
    if not vocab:
        raise DataError(f"{path}: empty vocabulary")
    return vocab


class VisualGenomeReader(Reader):
    """Reads VG into DetectionRecords with class and attribute indices from the given vocabularies.

    Objects whose names are all outside object_vocab are dropped and counted in `dropped`; a box's
    attribute is the first of its attributes found in attribute_vocab, or -1.
    """

    def __init__(
        self,
        image_root: str | Path,
        object_vocab: list[str],
        attribute_vocab: list[str],
        *,
        check_images: bool = False,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(check_images=check_images, skip_bad=skip_bad)
        self.image_root = Path(image_root)
        self.object_vocab, self.attribute_vocab = list(object_vocab), list(attribute_vocab)
        self._object_index = _vocab_index(self.object_vocab)
        self._attribute_index = _vocab_index(self.attribute_vocab)

    def read(
        self, objects_file: str | Path, attributes_file: str | Path | None, image_data_file: str | Path
    ) -> list[DetectionRecord]:
        """Records for the images in objects_file; attributes_file=None gives every box attribute -1."""
        sizes = _image_sizes(self, Path(image_data_file))
        attributes = self._attributes(Path(attributes_file), sizes) if attributes_file is not None else {}
        path = Path(objects_file)

        def parse(item: dict) -> DetectionRecord:
            image_id = _known(sizes, item)
            return self._record(image_id, sizes[image_id], list_field(item, "objects"), attributes.get(image_id, {}))

        records = self.parse_all(path, top_level(read_json(path), path), parse)
        return self.readable(path, records, lambda r: [r.image_path])

    def _attributes(self, path: Path, sizes: dict) -> dict[int, dict[int, int]]:
        """image id → object id → attribute index (or -1) from attributes.json."""

        def parse(item: dict) -> tuple[int, dict[int, int]]:
            image_id = _known(sizes, item)
            per_object = {}
            for entry in list_field(item, "attributes"):
                object_id = int_field(entry, "object_id")  # also checks that entry is an object
                per_object[object_id] = _first_in(entry.get("attributes") or [], self._attribute_index)
            return image_id, per_object

        return dict(self.parse_all(path, top_level(read_json(path), path), parse))

    def _record(self, image_id: int, size: tuple[int, int], objects: list, attributes: dict) -> DetectionRecord:
        width, height = size
        record = DetectionRecord(image_id, self.image_root / f"{image_id}.jpg", width, height, [], [], [])
        for obj in objects:
            object_id = int_field(obj, "object_id")
            x, y, w, h = (number_field(obj, key) for key in ("x", "y", "w", "h"))
            label = _first_in(list_field(obj, "names"), self._object_index)
            box = xywh_to_cxcywh(x, y, w, h, width, height)
            if label < 0:
                self.dropped["object not in object_vocab"] += 1
            elif box is None:
                self.dropped["box with no area inside the image"] += 1
            else:
                record.boxes.append(box)
                record.labels.append(label)
                record.attributes.append(attributes.get(object_id, -1))
        return record


class VisualGenomeRegionsReader(Reader):
    """Reads region_descriptions.json into CaptionRecords: an image's region phrases are its captions
    (stripped, exact repeats dropped, case-insensitively; images with no phrase left are dropped)."""

    def __init__(self, image_root: str | Path, *, check_images: bool = False, skip_bad: bool = False) -> None:
        super().__init__(check_images=check_images, skip_bad=skip_bad)
        self.image_root = Path(image_root)

    def read(self, regions_file: str | Path, image_data_file: str | Path) -> list[CaptionRecord]:
        sizes = _image_sizes(self, Path(image_data_file))
        path = Path(regions_file)

        def parse(item: dict) -> CaptionRecord | None:
            image_id = _known(sizes, item, "id" if "id" in item else "image_id")  # the file's own key is "id"
            phrases, seen = [], set()
            for region in list_field(item, "regions"):
                phrase = " ".join(str_field(region, "phrase").split())
                if phrase and _clean(phrase) not in seen:
                    seen.add(_clean(phrase))
                    phrases.append(phrase)
            if not phrases:
                self.dropped["image without a region phrase"] += 1
                return None
            width, height = sizes[image_id]
            return CaptionRecord(image_id, self.image_root / f"{image_id}.jpg", width, height, phrases)

        records = [r for r in self.parse_all(path, top_level(read_json(path), path), parse) if r is not None]
        return self.readable(path, records, lambda r: [r.image_path])


def _image_sizes(reader: Reader, path: Path) -> dict[int, tuple[int, int]]:
    """image id → (width, height) from image_data.json."""
    items = top_level(read_json(path), path)
    return dict(reader.parse_all(path, items, lambda item: (int_field(item, "image_id"), image_size(item))))


def _known(sizes: dict, item: dict, key: str = "image_id") -> int:
    image_id = int_field(item, key)
    if image_id not in sizes:
        raise BadRecord("unknown image id", f"{image_id} is not in image_data.json")
    return image_id
