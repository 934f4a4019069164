"""Object detection: data sets (COCO, YOLO, VOC, synthetic scenes), COCO-style evaluation
(pycocotools).

Invariant: like the rest of `edgewise.ml`, readers raise `DatasetError` for bad data and never
download anything; boxes are x1, y1, x2, y2 in pixels of the image they belong to.
"""

from ._data import (
    BOX_SIZE_BINS,
    DetectionDataset,
    detection_split,
    detection_stats,
    load_coco,
    load_detection_dataset,
    load_voc,
    load_yolo,
    write_coco,
)
from ._eval import Detections, coco_ground_truth, evaluate_detections
from ._synth import SynthConfig, synth_scenes, write_synth_coco

__all__ = [
    "BOX_SIZE_BINS",
    "DetectionDataset",
    "Detections",
    "SynthConfig",
    "coco_ground_truth",
    "detection_split",
    "detection_stats",
    "evaluate_detections",
    "load_coco",
    "load_detection_dataset",
    "load_voc",
    "load_yolo",
    "synth_scenes",
    "write_coco",
    "write_synth_coco",
]
