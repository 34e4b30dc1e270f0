"""Readers for COCO caption and instance files and for Karpathy's split files (COCO and Flickr30K)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .readers_base import (
    BadRecord,
    DataError,
    Reader,
    image_size,
    int_field,
    list_field,
    read_json,
    str_field,
    top_level,
    xywh_to_cxcywh,
)


@dataclass
class CaptionRecord:
    image_id: int
    image_path: Path
    width: int
    height: int
    captions: list[str]


@dataclass
class DetectionRecord:
    image_id: int
    image_path: Path
    width: int
    height: int
    boxes: list[list[float]]  # normalized cxcywh, one per object
    labels: list[int]  # contiguous class index per box
    attributes: list[int]  # attribute index per box, -1 when the box has none


@dataclass
class KarpathyRecord:
    image_id: int  # Karpathy's "imgid"
    image_path: Path
    split: str  # as in the file: "restval" stays visible after merging into train
    captions: list[str]  # the "raw" sentences
    tokens: list[list[str]]
    sentence_ids: list[int]


def _ids_to_indices(path: Path, items: list, what: str) -> tuple[dict[int, int], list[str]]:
    """Map {"id", "name"} entries to contiguous indices in id order (the order COCO tools use)."""
    entries = {}
    for index, item in enumerate(items):
        try:
            entries[int_field(item, "id")] = str_field(item, "name")
        except BadRecord as err:
            # A broken vocabulary shifts every index after it, so it is never skippable.
            raise BadRecord(f"{what} #{index}: {err}") from err
    ids = sorted(entries)
    return {cid: i for i, cid in enumerate(ids)}, [entries[cid] for cid in ids]


class _CocoImages(Reader):
    """Parses the "images" list that every COCO file shares."""

    def __init__(self, image_root: str | Path, *, check_images: bool = False, skip_bad: bool = False) -> None:
        super().__init__(check_images=check_images, skip_bad=skip_bad)
        self.image_root = Path(image_root)

    def images(self, path: Path, data: dict) -> dict[int, tuple[Path, int, int]]:
        """image id → (image path, width, height)."""

        def parse(item: dict) -> tuple[int, tuple[Path, int, int]]:
            image_id, file_name = int_field(item, "id"), str_field(item, "file_name")
            return image_id, (self.image_root / file_name, *image_size(item))

        return dict(self.parse_all(path, top_level(data, path, "images"), parse))

    @staticmethod
    def image_of(images: dict, item: dict) -> int:
        image_id = int_field(item, "image_id")
        if image_id not in images:
            raise BadRecord("unknown image id", f"{image_id} is not in 'images'")
        return image_id


class CocoCaptionsReader(_CocoImages):
    """Reads captions_*.json into one CaptionRecord per image (images without captions keep an empty list)."""

    def read(self, annotation_file: str | Path) -> list[CaptionRecord]:
        path = Path(annotation_file)
        data = read_json(path)
        images = self.images(path, data)
        captions: dict[int, list[str]] = {image_id: [] for image_id in images}

        def parse(item: dict) -> None:
            image_id, caption = self.image_of(images, item), str_field(item, "caption")
            captions[image_id].append(caption.strip())

        # Test-split info files have no "annotations": their images come back without captions.
        if isinstance(data, dict) and "annotations" in data:
            self.parse_all(path, top_level(data, path, "annotations"), parse)
        records = [CaptionRecord(i, p, w, h, captions[i]) for i, (p, w, h) in images.items()]
        return self.readable(path, records, lambda r: [r.image_path])


class CocoInstancesReader(_CocoImages):
    """Reads instances_*.json into one DetectionRecord per image; crowd boxes are dropped and counted."""

    def __init__(self, image_root: str | Path, *, check_images: bool = False, skip_bad: bool = False) -> None:
        super().__init__(image_root, check_images=check_images, skip_bad=skip_bad)
        self.class_names: list[str] = []
        self.attribute_names: list[str] = []

    def read(self, annotation_file: str | Path) -> list[DetectionRecord]:
        path = Path(annotation_file)
        data = read_json(path)
        images = self.images(path, data)
        class_of, attribute_of = self._vocabularies(path, data)
        boxes: dict[int, list[tuple[list[float], int, int]]] = {image_id: [] for image_id in images}

        def parse(item: dict) -> None:
            image_id = self.image_of(images, item)
            box, label, attribute = self._annotation(item, images[image_id], class_of, attribute_of)
            if item.get("iscrowd", 0):
                self.dropped["iscrowd box"] += 1
            elif box is None:
                self.dropped["box with no area inside the image"] += 1
            else:
                boxes[image_id].append((box, label, attribute))

        self.parse_all(path, top_level(data, path, "annotations"), parse)
        records = [
            DetectionRecord(
                image_id,
                image_path,
                width,
                height,
                boxes=[b for b, _, _ in boxes[image_id]],
                labels=[c for _, c, _ in boxes[image_id]],
                attributes=[a for _, _, a in boxes[image_id]],
            )
            for image_id, (image_path, width, height) in images.items()
        ]
        return self.readable(path, records, lambda r: [r.image_path])

    def _vocabularies(self, path: Path, data: dict) -> tuple[dict[int, int], dict[int, int]]:
        """Category and attribute id → contiguous index maps; sets class_names and attribute_names."""
        try:
            class_of, self.class_names = _ids_to_indices(path, top_level(data, path, "categories"), "category")
            attribute_of, self.attribute_names = _ids_to_indices(
                path, top_level(data, path, "attributes") if "attributes" in data else [], "attribute"
            )
        except BadRecord as err:
            raise DataError(f"{path}: {err}") from err
        return class_of, attribute_of

    @staticmethod
    def _annotation(
        item: dict, image: tuple, class_of: dict, attribute_of: dict
    ) -> tuple[list[float] | None, int, int]:
        """(normalized box or None, class index, attribute index or -1) of one annotation."""
        category_id = int_field(item, "category_id")
        if category_id not in class_of:
            raise BadRecord("unknown category id", str(category_id))
        bbox = list_field(item, "bbox")
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            raise BadRecord("bbox must have 4 numbers", repr(bbox))
        x, y, w, h = (float(v) for v in bbox)
        attribute_ids = item.get("attribute_ids") or []
        unknown = [a for a in attribute_ids if a not in attribute_of]
        if unknown:
            raise BadRecord("unknown attribute id", repr(unknown))
        attribute = attribute_of[attribute_ids[0]] if attribute_ids else -1
        _, width, height = image
        return xywh_to_cxcywh(x, y, w, h, width, height), class_of[category_id], attribute


_KARPATHY_SPLITS = ("train", "val", "test", "restval")


class KarpathyReader(Reader):
    """Reads dataset_coco.json / dataset_flickr30k.json for one split."""

    def __init__(self, image_root: str | Path, *, check_images: bool = False, skip_bad: bool = False) -> None:
        super().__init__(check_images=check_images, skip_bad=skip_bad)
        self.image_root = Path(image_root)

    def read(self, dataset_file: str | Path, split: str, *, merge_restval: bool = False) -> list[KarpathyRecord]:
        """Records of `split`; with merge_restval, split="train" also returns the "restval" images."""
        if split not in _KARPATHY_SPLITS:
            raise ValueError(f"split must be one of {_KARPATHY_SPLITS}, got {split!r}")
        wanted = {split, "restval"} if merge_restval and split == "train" else {split}
        path = Path(dataset_file)
        records = self.parse_all(path, top_level(read_json(path), path, "images"), self._parse)
        records = [r for r in records if r.split in wanted]
        return self.readable(path, records, lambda r: [r.image_path])

    def _parse(self, item: dict) -> KarpathyRecord:
        # Flickr30K entries have no "filepath": their images sit directly under image_root.
        folder = item.get("filepath", "") if isinstance(item, dict) else ""
        image_path = self.image_root / folder / str_field(item, "filename")
        split = str_field(item, "split")
        if split not in _KARPATHY_SPLITS:
            raise BadRecord("unknown split", repr(split))
        sentences = list_field(item, "sentences")
        return KarpathyRecord(
            image_id=int_field(item, "imgid"),
            image_path=image_path,
            split=split,
            captions=[str_field(s, "raw") for s in sentences],
            tokens=[list_field(s, "tokens") for s in sentences],
            sentence_ids=[int_field(s, "sentid") for s in sentences],
        )
