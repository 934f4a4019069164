"""Detector bundles: the exported graph, its contract, golden images with the boxes it finds.

The golden set is what the device's health check runs (`edgewise.agent._detect`): a few images
(as PNG for people and tools, and as the exact preprocessed tensors), and the boxes onnxruntime
found on them here, with the same graph the device will run.

Invariant: images reach the graph only through the bundle's preprocessing contract
(`preprocess_images`: the device's arithmetic), for golden inputs and for evaluation alike; a
bundle is written only when its golden images hold at least one box scoring >= `min_score`,
since a check with nothing to find proves nothing.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...artifacts import BundleManifest, ObjectDetectionSpec, Preprocessing, write_bundle
from ..errors import DatasetError, MLError
from ..quick import _ort_session, _p95_latency_ms, preprocess_images
from ._data import DetectionDataset
from ._eval import Detections, evaluate_detections

__all__ = ["GOLDEN_IMAGES", "contract_preprocessing", "evaluate_detector_bundle",
           "evaluate_detector_model", "write_detector_bundle"]

GOLDEN_IMAGES = 4
_CANDIDATES = 32  # golden images are the candidates with the most confident boxes
_UNUSED_ATOL = 1.0  # the golden spec's output tolerance: detectors are matched by IoU instead


def contract_preprocessing(contract: Mapping[str, Any]) -> Preprocessing:
    """The manifest's preprocessing section for a `detector.json` contract."""
    try:
        spec = contract["input"]
        _, channels, h, w = spec["shape"]
        return Preprocessing(input_size=(int(h), int(w)), channels=int(channels),
                             mean=tuple(spec["mean"]), std=tuple(spec["std"]), layout="NCHW",
                             input_name=spec["name"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MLError(f"not a detector contract (detector.json): {exc}") from exc


def _inputs(images: Sequence[np.ndarray], pre: Preprocessing) -> np.ndarray:
    """uint8 RGB [H, W, 3] images at the input size -> the contract's float32 [N, 3, H, W]."""
    h, w = pre.input_size
    for i, image in enumerate(images):
        if image.dtype != np.uint8 or image.shape != (h, w, 3):
            raise MLError(f"golden candidate {i}: expected uint8 RGB [{h}, {w}, 3], got "
                          f"{image.dtype} {list(image.shape)}")
    return preprocess_images(np.stack(images), pre)


def _detect(session, x: np.ndarray, input_name: str) -> tuple[np.ndarray, ...]:
    try:
        return tuple(session.run(["boxes", "scores", "labels"], {input_name: x}))
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise MLError(f"onnxruntime cannot run the detector: {exc}") from exc


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_detector_bundle(
    out_dir: Path | str, *, model: Path | str, contract: Mapping[str, Any],
    images: Sequence[np.ndarray], name: str, version: str, min_score: float = 0.3,
    iou_threshold: float = 0.5, min_recall: float = 0.9, min_precision: float = 0.9,
    golden_count: int = GOLDEN_IMAGES, extra_files: Mapping[str, Path | bytes] | None = None,
    metrics: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None,
) -> BundleManifest:
    """Bundle an exported detector (`model.onnx` as `export_detector_onnx` writes it, and its
    `detector.json` contract): the golden images are the `golden_count` of the first
    candidate `images` (uint8 RGB at the input size) on which it finds the most boxes."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MLError(f"{out_dir} exists and is not empty; choose a new folder")
    pre = contract_preprocessing(contract)
    class_names = list(contract.get("class_names") or [])
    if not class_names:
        raise MLError("the detector contract names no classes")
    if golden_count < 1 or not images:
        raise MLError("a detector bundle needs at least one golden image")
    candidates = list(images[:_CANDIDATES])
    x = _inputs(candidates, pre)
    session = _ort_session(model, threads=1)
    found = [_detect(session, x[i:i + 1], pre.input_name) for i in range(len(x))]
    confident = [int((scores >= min_score).sum()) for _, scores, _ in found]
    order = sorted(range(len(found)), key=lambda i: -confident[i])[:golden_count]
    order = [i for i in order if confident[i]]
    if not order:
        raise MLError(f"the detector finds no box scoring >= {min_score:g} on any of "
                      f"{len(found)} images: it has not learned to find anything (train "
                      "longer), and a health check with nothing to find would prove nothing")

    # Golden rows: every box down to half of min_score (the check's matching floor), padded.
    floor = min_score / 2
    kept = []
    for i in order:
        boxes, scores, labels = found[i]
        keep = scores >= floor
        kept.append(np.concatenate([boxes[keep], scores[keep, None],
                                    labels[keep, None].astype(np.float32)], 1))
    rows = np.zeros((len(order), max(len(k) for k in kept), 6), np.float32)
    rows[:, :, 5] = -1
    for r, k in zip(rows, kept, strict=True):
        r[:len(k)] = k
    p95_ms = _p95_latency_ms(Path(model), x[order[0]:order[0] + 1])

    spec = ObjectDetectionSpec(max_detections=int(contract.get("max_detections", 1)),
                               min_score=min_score, iou_threshold=iou_threshold,
                               min_recall=min_recall, min_precision=min_precision)
    files: dict[str, Path | bytes] = {
        spec.contract: (json.dumps(dict(contract), indent=1) + "\n").encode()}
    for n, i in enumerate(order):
        files[f"golden/{n:02d}.png"] = _png(candidates[i])
    files.update(extra_files or {})
    return write_bundle(
        out_dir, name=name, version=version, labels=class_names, preprocessing=pre,
        model=Path(model), golden_inputs=x[order], golden_outputs=rows, atol=_UNUSED_ATOL,
        max_latency_ms=max(250.0, 10.0 * p95_ms), extra_files=files,
        metrics={**(metrics or {}), "golden_boxes": int(sum(confident[i] for i in order)),
                 "p95_latency_ms": round(p95_ms, 2)},
        provenance=dict(provenance or {}), kind="object-detector", detection=spec)


def evaluate_detector_bundle(bundle_dir: Path | str, manifest: BundleManifest,
                             dataset: DetectionDataset, *, limit: int | None = None
                             ) -> dict[str, Any]:
    """mAP of a (validated) detector bundle on a detection data set, run as a device runs it:
    each image resized and normalised per the contract, the graph's boxes scaled back to the
    image's pixels, every detection the graph returns scored (mAP wants the whole
    precision-recall curve). Classes are matched by name; detections of classes the data set
    does not have are dropped."""
    if manifest.detection is None:
        raise MLError(f"{manifest.release_name} is not an object detector")
    if limit:
        dataset = dataset.subset(range(min(limit, len(dataset))))
    return evaluate_detector_model(Path(bundle_dir) / manifest.model, manifest.preprocessing,
                                   manifest.labels, dataset)


def evaluate_detector_model(model: Path | str, preprocessing: Preprocessing,
                            labels: Sequence[str], dataset: DetectionDataset, *,
                            threads: int | None = None) -> dict[str, Any]:
    """`evaluate_detector_bundle` for any graph of the detector contract (e.g. a compressed
    candidate of a bundle, before it is bundled itself)."""
    labels = list(labels)
    to_data = {labels.index(n): i for i, n in enumerate(dataset.class_names) if n in labels}
    missing = [n for n in dataset.class_names if n not in labels]
    if missing:
        raise DatasetError(f"classes {missing} of {dataset.source} are not classes of the "
                           f"bundle ({', '.join(labels)})")
    pre = preprocessing
    session = _ort_session(model, threads=threads)
    in_h, in_w = pre.input_size
    found = []
    for image in dataset.images:
        boxes, scores, classes = _detect(session, preprocess_images(image[None], pre),
                                         pre.input_name)
        h, w = image.shape[:2]
        keep = np.array([int(c) in to_data for c in classes], bool).reshape(-1)
        found.append(Detections(
            boxes[keep] * np.array([w / in_w, h / in_h, w / in_w, h / in_h], np.float32),
            scores[keep], np.array([to_data[int(c)] for c in classes[keep]], np.int64)))
    return evaluate_detections(dataset, found)
