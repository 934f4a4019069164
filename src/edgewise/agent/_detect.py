"""Object detectors on the device: boxes in image pixels, and the golden-box health check.

A detector's health cannot be judged by comparing output tensors within a tolerance: a box
may move by a fraction of a pixel, a low score may cross the threshold, the order of equal
scores may change (int8, another CPU). So the check matches boxes, as detectors are judged:
a golden box (found by the model at build time) is found again when a detection of the same
label overlaps it by IoU >= the manifest's threshold, and recall and precision over all golden
images must reach the manifest's bars.

Invariant: pure numpy, no torch; the thresholds come from the signed manifest only, and a
golden set without a single box to find fails the check (it would prove nothing).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..artifacts import ObjectDetectionSpec

__all__ = ["DetectionPrediction", "box_iou", "draw_detections", "golden_box_agreement",
           "match_boxes"]

# A counterpart may score down to this share of `min_score` and still match (hysteresis).
_MATCH_SCORE_SHARE = 0.5


@dataclass(frozen=True)
class DetectionPrediction:
    """What `POST /predict` answers for a detector: boxes in the submitted image's pixels."""

    detections: list[dict[str, Any]]  # {label, index, score, x1, y1, x2, y2}, best first
    image_size: tuple[int, int]  # (width, height) of the submitted image
    anomaly: None = None  # detectors carry no anomaly score (the LocalModel interface)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "object-detector", "detections": self.detections,
                "image_size": list(self.image_size)}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` [n, 4] with every box of `b` [m, 4] (x1, y1, x2, y2) -> [n, m]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_boxes(ref_boxes: np.ndarray, ref_labels: np.ndarray, boxes: np.ndarray,
                labels: np.ndarray, iou_threshold: float) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching, reference boxes in the order given (best score first): each
    takes the unmatched box of its label with the highest IoU >= `iou_threshold`. Returns
    (reference index, box index, IoU) per match."""
    iou = box_iou(ref_boxes, boxes)
    same = np.asarray(ref_labels).reshape(-1, 1) == np.asarray(labels).reshape(1, -1)
    iou = np.where(same, iou, 0.0)
    taken: set[int] = set()
    pairs = []
    for i in range(iou.shape[0]):
        for j in np.argsort(-iou[i]):
            if iou[i, j] < iou_threshold:
                break
            if int(j) not in taken:
                taken.add(int(j))
                pairs.append((i, int(j), float(iou[i, j])))
                break
    return pairs


def golden_box_agreement(expected: np.ndarray,
                         found: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                         spec: ObjectDetectionSpec) -> dict[str, Any]:
    """Compare what the model found on each golden image (boxes, scores, labels) with the
    golden rows [count, M, 6] (x1, y1, x2, y2, score, label; label -1 pads). Recall: golden
    boxes scoring >= min_score that a detection matches; precision: detections scoring
    >= min_score that match a golden box. Either side's counterpart may score down to half
    of min_score."""
    floor = spec.min_score * _MATCH_SCORE_SHARE
    n_golden = n_found = n_detections = n_true = 0
    ious, shifts = [], []
    for rows, (boxes, scores, labels) in zip(expected, found, strict=True):
        rows = rows[rows[:, 5] >= 0]
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        labels = np.asarray(labels).reshape(-1)
        gold = rows[rows[:, 4] >= spec.min_score]
        gold_any = rows[rows[:, 4] >= floor]
        conf, near = scores >= spec.min_score, scores >= floor
        pairs = match_boxes(gold[:, :4], gold[:, 5], boxes[near], labels[near],
                            spec.iou_threshold)
        n_golden += len(gold)
        n_found += len(pairs)
        near_boxes = boxes[near]
        for i, j, iou in pairs:
            ious.append(iou)
            shifts.append(float(np.abs(near_boxes[j] - gold[i, :4]).max()))
        n_detections += int(conf.sum())
        n_true += len(match_boxes(boxes[conf], labels[conf], gold_any[:, :4], gold_any[:, 5],
                                  spec.iou_threshold))
    return {"golden_boxes": n_golden, "found": n_found, "detections": n_detections,
            "true_detections": n_true,
            "recall": n_found / n_golden if n_golden else 0.0,
            "precision": n_true / n_detections if n_detections else 1.0,
            "mean_iou": float(np.mean(ious)) if ious else 0.0,
            "max_shift_px": max(shifts) if shifts else 0.0}


def draw_detections(image: bytes, prediction: DetectionPrediction) -> bytes:
    """The image as PNG with each detection's box and label drawn on it."""
    from PIL import Image, ImageDraw

    with Image.open(io.BytesIO(image)) as img:
        canvas = img.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    palette = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255),
               (0, 200, 200))
    for d in prediction.detections:
        colour = palette[d["index"] % len(palette)]
        draw.rectangle((d["x1"], d["y1"], d["x2"], d["y2"]), outline=colour, width=2)
        draw.text((d["x1"] + 2, d["y1"] + 1), f"{d['label']} {d['score']:.2f}", fill=colour)
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()
