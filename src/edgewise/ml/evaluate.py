"""`edgewise eval`: score any bundle on a labelled data set with onnxruntime, as a device would.

Invariant: the bundle is fully validated first, and the images go through exactly the bundle's
preprocessing contract (`preprocess_images`), never through training code, so the figure is
what the shipped model does. Labels are matched by class name, not by position. An object
detector is scored by mAP on a detection data set (`ml.detect.evaluate_detector_bundle`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgewise.artifacts import validate_bundle

from .data import load_dataset
from .errors import DatasetError
from .quick import _ort_run, _ort_session, preprocess_images

__all__ = ["evaluate_bundle", "resolve_bundle_dir"]


def resolve_bundle_dir(path: Path | str) -> Path:
    """A bundle directory, or a `train --out` directory holding one in `bundle/`."""
    path = Path(path)
    if not (path / "edgewise.json").is_file() and (path / "bundle" / "edgewise.json").is_file():
        return path / "bundle"
    return path


def evaluate_bundle(bundle: Path | str, data: str = "fashion-mnist", *,
                    split: str = "test", limit: int | None = None) -> dict[str, Any]:
    bundle_dir = resolve_bundle_dir(bundle)
    manifest = validate_bundle(bundle_dir)
    if getattr(manifest, "detection", None) is not None:
        return _evaluate_detector(bundle_dir, manifest, data, split=split, limit=limit)
    train, test = load_dataset(data)
    if split == "test":
        ds = test if test is not None else train  # a plain image folder: score all of it
    elif split == "train":
        ds = train
    else:
        raise DatasetError(f"unknown split {split!r} (use test or train)")
    position = {name: i for i, name in enumerate(manifest.labels)}
    missing = [n for n in ds.class_names if n not in position]
    if missing:
        raise DatasetError(f"classes {missing} of {data} are not labels of the bundle "
                           f"({', '.join(manifest.labels)})")
    labels = np.array([position[ds.class_names[y]] for y in ds.labels], np.int64)
    images = ds.images
    if limit:
        images, labels = images[:limit], labels[:limit]
    started = time.perf_counter()
    session = _ort_session(bundle_dir / manifest.model)
    logits = _ort_run(session, preprocess_images(images, manifest.preprocessing))
    preds = logits.argmax(1)
    per_class = {}
    for i, name in enumerate(manifest.labels):
        mask = labels == i
        if mask.any():
            per_class[name] = round(float((preds[mask] == i).mean()), 4)
    return {"bundle": manifest.release_name, "data": str(data), "split": split,
            "images": int(len(labels)), "accuracy": round(float((preds == labels).mean()), 4),
            "per_class_accuracy": per_class, "seconds": round(time.perf_counter() - started, 2),
            "manifest_test_accuracy": manifest.metrics.get("test_accuracy")}


def _evaluate_detector(bundle_dir: Path, manifest, data: str, *, split: str,
                       limit: int | None) -> dict[str, Any]:
    """An object detector on a COCO, YOLO or VOC folder: mAP by pycocotools."""
    from .detect import evaluate_detector_bundle, load_detection_dataset

    if data == "fashion-mnist" or split != "test":
        raise DatasetError(f"{manifest.release_name} is an object detector: pass --data, a "
                           "COCO, YOLO or VOC folder, scored whole (no --split)")
    started = time.perf_counter()
    m = evaluate_detector_bundle(bundle_dir, manifest, load_detection_dataset(data),
                                 limit=limit)
    return {"bundle": manifest.release_name, "kind": "object-detector", "data": str(data),
            "images": m["images"], "map50": round(m["map50"], 4),
            "map50_95": round(m["map50_95"], 4), "detections": m["detections"],
            "per_class": m["per_class"], "seconds": round(time.perf_counter() - started, 2),
            "manifest_val_map50": manifest.metrics.get("val_map50")}
