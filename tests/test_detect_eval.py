"""mAP@0.5 and mAP@0.5:0.95 through pycocotools on cases whose answer is known."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from edgewise.ml import MLError
from edgewise.ml.detect import (
    DetectionDataset,
    Detections,
    coco_ground_truth,
    evaluate_detections,
)

NAMES = ("a", "b", "c")


def _ground_truth() -> DetectionDataset:
    boxes = [np.array([[10, 10, 50, 50], [60, 20, 90, 80]], np.float32),
             np.array([[5, 5, 45, 35]], np.float32),
             np.array([[30, 30, 70, 90], [0, 0, 20, 20]], np.float32)]
    labels = [np.array([0, 1]), np.array([1]), np.array([0, 0])]
    return DetectionDataset(tuple(np.zeros((100, 100, 3), np.uint8) for _ in boxes),
                            tuple(boxes), tuple(labels), NAMES, ("0.png", "1.png", "2.png"),
                            "test")


def _perfect(gt: DetectionDataset, *, shift: float = 0.0, relabel=None) -> list[Detections]:
    out = []
    for boxes, labels in zip(gt.boxes, gt.labels, strict=True):
        lab = labels if relabel is None else relabel(labels)
        out.append(Detections(boxes + shift, np.linspace(0.9, 0.8, len(boxes)), lab))
    return out


def test_perfect_predictions_score_one() -> None:
    gt = _ground_truth()
    m = evaluate_detections(gt, _perfect(gt))
    assert m["map50"] == pytest.approx(1.0) and m["map50_95"] == pytest.approx(1.0)
    assert m["per_class"]["a"] == {"ap50": pytest.approx(1.0), "ap50_95": pytest.approx(1.0)}
    assert m["per_class"]["c"] == {"ap50": None, "ap50_95": None}  # no ground truth


def test_shifted_boxes_score_lower() -> None:
    gt = _ground_truth()
    small = evaluate_detections(gt, _perfect(gt, shift=3.0))
    large = evaluate_detections(gt, _perfect(gt, shift=8.0))
    # A 3 px shift keeps IoU >= 0.5 (mAP@0.5 stays 1) but fails the strict thresholds.
    assert small["map50"] == pytest.approx(1.0)
    assert 0.0 < large["map50_95"] < small["map50_95"] < 1.0


def test_wrong_labels_score_zero() -> None:
    gt = _ground_truth()
    m = evaluate_detections(gt, _perfect(gt, relabel=lambda lab: np.full_like(lab, 2)))  # all "c"
    assert m["per_class"]["a"]["ap50"] == 0.0 and m["per_class"]["b"]["ap50"] == 0.0
    assert m["map50"] == 0.0 and m["map50_95"] == 0.0


def test_no_predictions_and_missed_objects() -> None:
    gt = _ground_truth()
    empty = [Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))] * 3
    assert evaluate_detections(gt, empty)["map50"] == 0.0
    half = _perfect(gt)
    half[2] = empty[0]  # miss both "a" objects of image 2: class a recall 1/3
    m = evaluate_detections(gt, half)
    assert m["per_class"]["a"]["ap50"] == pytest.approx(1 / 3, abs=0.01)
    assert m["per_class"]["b"]["ap50"] == pytest.approx(1.0)


def test_matches_cocoeval_summary() -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _ground_truth()
    rng = np.random.default_rng(0)
    preds = [Detections(b + rng.normal(0, 4, b.shape), rng.uniform(size=len(b)), lab)
             for b, lab in zip(gt.boxes, gt.labels, strict=True)]
    m = evaluate_detections(gt, preds)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = coco_ground_truth(gt)
        coco.createIndex()
        dets = [{"image_id": i + 1, "category_id": int(c) + 1, "score": float(s),
                 "bbox": [x1, y1, x2 - x1, y2 - y1]}
                for i, p in enumerate(preds)
                for (x1, y1, x2, y2), s, c in zip(p.boxes.tolist(), p.scores, p.labels,
                                                  strict=True)]
        ev = COCOeval(coco, coco.loadRes(dets), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert m["map50_95"] == pytest.approx(ev.stats[0]) and m["map50"] == pytest.approx(
        ev.stats[1])


def test_bad_predictions() -> None:
    gt = _ground_truth()
    with pytest.raises(MLError, match="2 predictions for 3 images"):
        evaluate_detections(gt, _perfect(gt)[:2])
    bad = _perfect(gt, relabel=lambda lab: lab + 5)
    with pytest.raises(MLError, match="out of range"):
        evaluate_detections(gt, bad)
