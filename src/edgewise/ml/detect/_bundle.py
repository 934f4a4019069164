"""Detector bundles: the exported graph, its contract, golden images with the boxes it finds.

The golden set is what the device's health check runs (`edgewise.agent._detect`): a few images
(as PNG for people and tools, and as the exact preprocessed tensors), and the boxes onnxruntime
found on them here, with the same graph the device will run.

Invariant: golden inputs are made with the device's own arithmetic (pixels / 255, then
(x - mean) / std in float32, NCHW); a bundle is written only when its golden images hold at
least one box scoring >= `min_score`, since a check with nothing to find proves nothing.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...artifacts import BundleManifest, ObjectDetectionSpec, Preprocessing, write_bundle
from ..errors import MLError
from ..quick import _p95_latency_ms

__all__ = ["GOLDEN_IMAGES", "contract_preprocessing", "write_detector_bundle"]

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
    """uint8 RGB [H, W, 3] images at the input size -> float32 [N, 3, H, W], as the agent's
    `preprocess_image` computes it."""
    h, w = pre.input_size
    out = []
    for i, image in enumerate(images):
        if image.dtype != np.uint8 or image.shape != (h, w, 3):
            raise MLError(f"golden candidate {i}: expected uint8 RGB [{h}, {w}, 3], got "
                          f"{image.dtype} {list(image.shape)}")
        pixels = np.asarray(image, np.float32) / 255.0
        pixels = (pixels - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        out.append(pixels.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


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
    import onnxruntime as ort

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
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        found = [session.run(["boxes", "scores", "labels"], {pre.input_name: x[i:i + 1]})
                 for i in range(len(x))]
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise MLError(f"{model}: onnxruntime cannot run the detector: {exc}") from exc
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
