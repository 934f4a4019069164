"""COCO-style detection metrics, computed by pycocotools on COCO-format ground truth.

Invariant: the numbers are pycocotools' own (`COCOeval` with iouType "bbox", its 101-point
interpolated precision, maxDets 100, area "all"); this module only converts our in-memory
form (x1, y1, x2, y2 pixels, 0-based labels) to COCO's (x, y, w, h, category ids) and reads
the per-class slices out of its precision table. A class without ground truth has no AP
(None), and is left out of the means, as COCO does.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MLError
from ._data import DetectionDataset

__all__ = ["Detections", "coco_ground_truth", "evaluate_detections"]


@dataclass(frozen=True)
class Detections:
    """One image's predictions: boxes float [n, 4] x1, y1, x2, y2 pixels, scores [n], labels
    int [n] (0-based, indexing the data set's classes)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def coco_ground_truth(dataset: DetectionDataset) -> dict[str, Any]:
    """The data set as a COCO dict (image ids 1.., category ids = label + 1)."""
    images, anns = [], []
    for i, (image, boxes, labels) in enumerate(zip(dataset.images, dataset.boxes,
                                                   dataset.labels, strict=True)):
        images.append({"id": i + 1, "width": int(image.shape[1]), "height": int(image.shape[0]),
                       "file_name": dataset.file_names[i]})
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist(), strict=True):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": c + 1, "name": n} for c, n in enumerate(dataset.class_names)]}


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else 0.0


def evaluate_detections(dataset: DetectionDataset,
                        predictions: list[Detections]) -> dict[str, Any]:
    """mAP@0.5 and mAP@0.5:0.95 overall and per class of `predictions` (one per image)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise MLError("detection metrics need pycocotools; install edgewise[ml]") from exc
    if len(predictions) != len(dataset):
        raise MLError(f"{len(predictions)} predictions for {len(dataset)} images")
    n_classes = len(dataset.class_names)
    results = []
    for i, det in enumerate(predictions):
        boxes = np.asarray(det.boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(det.scores, np.float64).reshape(-1)
        labels = np.asarray(det.labels, np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise MLError(f"image {i}: {len(boxes)} boxes, {len(scores)} scores, "
                          f"{len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise MLError(f"image {i}: predicted label out of range [0, {n_classes})")
        for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), scores.tolist(), labels.tolist(),
                                          strict=True):
            results.append({"image_id": i + 1, "category_id": c + 1,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    per_class: dict[str, dict[str, float | None]] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = coco_ground_truth(dataset)
        gt.createIndex()
        has_gt = [bool(gt.getAnnIds(catIds=[c + 1])) for c in range(n_classes)]
        if results:
            ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
            ev.evaluate()
            ev.accumulate()
            # precision[T, R, K, A, M]: IoU thresholds (0.5:0.95), recall points, classes,
            # area ranges (0: all), max detections (-1: 100).
            precision = ev.eval["precision"][:, :, :, 0, -1]
    for c, name in enumerate(dataset.class_names):
        if not has_gt[c]:
            per_class[name] = {"ap50": None, "ap50_95": None}
            continue
        if not results:
            per_class[name] = {"ap50": 0.0, "ap50_95": 0.0}
            continue
        p = precision[:, :, c]
        # pycocotools writes -1 only for classes without ground truth (skipped above).
        p = np.where(p < 0, 0.0, p)
        per_class[name] = {"ap50": float(p[0].mean()), "ap50_95": float(p.mean())}
    return {"map50": _mean([v["ap50"] for v in per_class.values()]),
            "map50_95": _mean([v["ap50_95"] for v in per_class.values()]),
            "per_class": per_class, "images": len(dataset), "detections": len(results)}
