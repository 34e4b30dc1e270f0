"""Dataset readers for the real COCO, Visual Genome, VQA v2, NLVR2 and Karpathy-split files (public API)."""

from .readers_base import DataError, Reader, load_image, read_json, xywh_to_cxcywh
from .readers_coco import (
    CaptionRecord,
    CocoCaptionsReader,
    CocoInstancesReader,
    DetectionRecord,
    KarpathyReader,
    KarpathyRecord,
)
from .readers_nlvr2 import NLVR2Reader, NLVR2Record
from .readers_vg import VisualGenomeReader, VisualGenomeRegionsReader, read_vocab
from .readers_vqa import (
    VQAReader,
    VQARecord,
    answer_scores,
    build_answer_vocab,
    coco_image_paths,
    normalize_answer,
    soft_target,
)

__all__ = [
    "CaptionRecord",
    "CocoCaptionsReader",
    "CocoInstancesReader",
    "DataError",
    "DetectionRecord",
    "KarpathyReader",
    "KarpathyRecord",
    "NLVR2Reader",
    "NLVR2Record",
    "Reader",
    "VQAReader",
    "VQARecord",
    "VisualGenomeReader",
    "VisualGenomeRegionsReader",
    "answer_scores",
    "build_answer_vocab",
    "coco_image_paths",
    "load_image",
    "normalize_answer",
    "read_json",
    "read_vocab",
    "soft_target",
    "xywh_to_cxcywh",
]
