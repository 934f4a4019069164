"""Object detection: data sets (COCO, YOLO, VOC, synthetic scenes), COCO-style evaluation
(pycocotools), and a CenterNet detector on EfficientNet-Lite0 exported with its decoding and
NMS inside the ONNX graph, bundled with golden images and the boxes the device must find.

Invariant: like the rest of `edgewise.ml`, readers raise `DatasetError` for bad data and never
download anything; boxes are x1, y1, x2, y2 in pixels of the image they belong to.
"""

from ._augment import DETECT_AUGMENT_PRESETS, DetectAugment, augment_detection_batch
from ._bundle import (
    GOLDEN_IMAGES,
    contract_preprocessing,
    evaluate_detector_bundle,
    evaluate_detector_model,
    write_detector_bundle,
)
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
from ._model import CenterNetDetector, export_detector_onnx, onnx_detect
from ._synth import SynthConfig, synth_scenes, write_synth_coco
from ._train import DetectConfig, DetectResult, detector_contract, resize_dataset, train_detector

__all__ = [
    "BOX_SIZE_BINS",
    "DETECT_AUGMENT_PRESETS",
    "GOLDEN_IMAGES",
    "CenterNetDetector",
    "DetectAugment",
    "DetectConfig",
    "DetectResult",
    "DetectionDataset",
    "Detections",
    "SynthConfig",
    "augment_detection_batch",
    "coco_ground_truth",
    "contract_preprocessing",
    "detection_split",
    "detection_stats",
    "detector_contract",
    "evaluate_detections",
    "evaluate_detector_bundle",
    "evaluate_detector_model",
    "export_detector_onnx",
    "load_coco",
    "load_detection_dataset",
    "load_voc",
    "load_yolo",
    "onnx_detect",
    "resize_dataset",
    "synth_scenes",
    "train_detector",
    "write_coco",
    "write_detector_bundle",
    "write_synth_coco",
]
