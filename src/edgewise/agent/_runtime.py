"""On-device inference and the health check, per bundle kind (the component runtime seam).

What differs per kind sits behind `ComponentRuntime` (stage, activate, health-check, stop):
image models (classifiers, generators' anomaly scores, object detectors: `_detect`) run on
onnxruntime (here) and LLMs and their LoRA adapters on llama.cpp (`_llm`), all served from the
active slot by the agent itself (`ModelRuntime`); container apps run in podman or docker
(`_containers.ContainerRuntime`). The update state machine calls the seam, whatever the kind;
a rollback is `activate` of the committed slot.

Invariant: inputs are prepared exactly as the bundle's preprocessing contract says, and
nothing here sends data anywhere: images stay on the device.
"""

from __future__ import annotations

import io
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import (
    BundleError,
    BundleManifest,
    LlmAdapterManifest,
    LlmManifest,
    Manifest,
    Preprocessing,
    load_golden,
    read_manifest,
)
from ..llm import rss_mb
from ._detect import DetectionPrediction, golden_box_agreement
from ._errors import HealthCheckFailed, UpdateRejected

__all__ = ["ComponentRuntime", "HealthReport", "ModelRuntime", "OnnxModel", "Prediction",
           "health_check", "preprocess_image"]


def preprocess_image(data: bytes, contract: Preprocessing) -> np.ndarray:
    """Decode an image and turn it into one model input (batch of 1) per the contract."""
    return _preprocess_sized(data, contract)[0]


def _preprocess_sized(data: bytes, contract: Preprocessing
                      ) -> tuple[np.ndarray, tuple[int, int]]:
    """`preprocess_image`, and the decoded image's (width, height)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if contract.channels == 1 else "RGB")
            size = img.size
            h, w = contract.input_size
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32) / 255.0
    except UnidentifiedImageError as exc:
        raise ValueError("not a readable image (expected PNG, JPEG, BMP, ...)") from exc
    except (OSError, ValueError) as exc:
        raise ValueError(f"not a readable image: {exc}") from exc
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = (pixels - np.asarray(contract.mean, np.float32)) / np.asarray(contract.std, np.float32)
    if contract.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return pixels[None].astype(np.float32), size


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float
    top: list[tuple[str, float]]
    # {"score", "threshold", "anomalous"} when the bundle has a detector, else None
    anomaly: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"label": self.label, "index": self.index, "score": self.score,
               "top": [{"label": lbl, "score": s} for lbl, s in self.top]}
        if self.anomaly is not None:
            out["anomaly"] = self.anomaly
        return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class OnnxModel:
    """A bundle loaded into an onnxruntime session."""

    def __init__(self, bundle_dir: Path, *, threads: int = 1) -> None:
        import onnxruntime as ort

        self.dir = Path(bundle_dir)
        try:
            manifest = read_manifest(self.dir)
        except BundleError as exc:
            raise UpdateRejected(str(exc)) from exc
        if not isinstance(manifest, BundleManifest):
            raise UpdateRejected(f"{manifest.release_name} is an {manifest.kind} bundle, not an "
                                 "image model")
        self.manifest: BundleManifest = manifest
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.dir / self.manifest.model), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise HealthCheckFailed(f"onnxruntime cannot load the model: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self._detector = None

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: batch})[0])

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An object detector's (boxes [N, 4] in input pixels, scores [N], labels [N]) for one
        preprocessed image [1, ...]."""
        boxes, scores, labels = self.session.run(["boxes", "scores", "labels"],
                                                 {self.input_name: image})
        return (np.asarray(boxes, np.float32).reshape(-1, 4),
                np.asarray(scores, np.float32).reshape(-1), np.asarray(labels).reshape(-1))

    def anomaly(self, batch: np.ndarray) -> dict[str, Any] | None:
        """The bundle's anomaly score of one preprocessed input, or None without a detector."""
        spec = self.manifest.detector
        if spec is None:
            return None
        if self._detector is None:
            if spec.model == self.manifest.model:
                self._detector = self.session
            else:
                import onnxruntime as ort

                self._detector = ort.InferenceSession(str(self.dir / spec.model),
                                                      providers=["CPUExecutionProvider"])
        name = self._detector.get_inputs()[0].name
        score = float(np.asarray(self._detector.run([spec.output], {name: batch})[0]).ravel()[0])
        return {"score": score, "threshold": spec.threshold,
                "anomalous": bool(score > spec.threshold)}

    def predict(self, image: bytes, *, top_k: int = 3) -> Prediction | DetectionPrediction:
        if self.manifest.detection is not None:
            return self._predict_boxes(image)
        x = preprocess_image(image, self.manifest.preprocessing)
        anomaly = self.anomaly(x)
        if self.manifest.kind != "image-classifier":
            # a detector-only bundle: the "prediction" is normal / anomalous
            if anomaly is None:
                raise ValueError(f"a {self.manifest.kind} bundle without a detector cannot "
                                 "classify images")
            label = "anomalous" if anomaly["anomalous"] else "normal"
            return Prediction(label=label, index=int(anomaly["anomalous"]),
                              score=anomaly["score"], top=[], anomaly=anomaly)
        logits = self.run(x)[0]
        probs = _softmax(logits.astype(np.float64))
        order = np.argsort(-probs)[:top_k]
        labels = self.manifest.labels
        return Prediction(label=labels[order[0]], index=int(order[0]),
                          score=float(probs[order[0]]),
                          top=[(labels[i], float(probs[i])) for i in order], anomaly=anomaly)

    def _predict_boxes(self, image: bytes) -> DetectionPrediction:
        """The detections scoring >= the manifest's min_score, best first, as boxes in the
        submitted image's pixels (the model saw it resized to its input size)."""
        spec = self.manifest.detection
        assert spec is not None
        x, (width, height) = _preprocess_sized(image, self.manifest.preprocessing)
        boxes, scores, labels = self.detect(x)
        in_h, in_w = self.manifest.preprocessing.input_size
        scale = np.array([width / in_w, height / in_h, width / in_w, height / in_h])
        names = self.manifest.labels
        found = []
        for box, score, label in zip(boxes.astype(np.float64) * scale, scores.tolist(),
                                     labels.tolist(), strict=True):
            if score < spec.min_score:
                continue
            if not 0 <= label < len(names):
                raise HealthCheckFailed(f"the model answered label {label}, outside its "
                                        f"{len(names)} classes")
            x1, y1, x2, y2 = (round(float(v), 2) for v in box)
            found.append({"label": names[label], "index": int(label),
                          "score": round(float(score), 4), "x1": x1, "y1": y1, "x2": x2,
                          "y2": y2})
        return DetectionPrediction(found, (width, height))


@dataclass(frozen=True)
class HealthReport:
    passed: bool
    max_abs_diff: float
    top1_agreement: float
    p95_latency_ms: float
    reason: str
    memory_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # figures of one bundle kind

    def to_json(self) -> dict[str, Any]:
        return {**self.extra, "passed": self.passed, "max_abs_diff": self.max_abs_diff,
                "top1_agreement": self.top1_agreement, "p95_latency_ms": self.p95_latency_ms,
                "memory_mb": self.memory_mb, "reason": self.reason}


def health_check(bundle_dir: Path, *, ram_limit_mb: float | None = None) -> HealthReport:
    """The health check of whatever kind of bundle `bundle_dir` holds."""
    try:
        manifest = read_manifest(Path(bundle_dir))
    except BundleError as exc:
        raise UpdateRejected(str(exc)) from exc
    if isinstance(manifest, LlmManifest):
        from ._llm import llm_health_check

        return llm_health_check(Path(bundle_dir), manifest, ram_limit_mb=ram_limit_mb)
    if isinstance(manifest, LlmAdapterManifest):
        from ._llm import adapter_health_check

        return adapter_health_check(Path(bundle_dir), manifest, ram_limit_mb=ram_limit_mb)
    return onnx_health_check(bundle_dir)


class ComponentRuntime(ABC):
    """One kind's lifecycle on the device. Every step is idempotent (the agent redoes the
    interrupted one after a power cut) and raises `AgentError`s or `OSError` on failure.

    - `stage`: make the verified slot ready to run (e.g. import an image), the active
      release untouched; `keep` are the other releases the device must still be able to
      activate without a download (the committed one).
    - `activate`: run the release of this slot, replacing the same component's running one.
    - `health_check`: the kind's contract, measured on the activated release.
    - `stop`: the component stops running (another kind replaced it, or it was rolled back
      to nothing).
    """

    @abstractmethod
    def stage(self, slot_dir: Path, manifest: Manifest, *, keep: list[Manifest]) -> None: ...

    @abstractmethod
    def activate(self, slot_dir: Path, manifest: Manifest) -> None: ...

    @abstractmethod
    def health_check(self, slot_dir: Path, manifest: Manifest) -> HealthReport: ...

    @abstractmethod
    def stop(self, slot_dir: Path, manifest: Manifest) -> None: ...


class ModelRuntime(ComponentRuntime):
    """Image models and LLMs: served in the agent's process from the active slot, so staging
    and activating are the slot switch itself; a health check loads and measures the model."""

    def __init__(self, *, ram_limit_mb: float | None = None) -> None:
        self.ram_limit_mb = ram_limit_mb

    def stage(self, slot_dir: Path, manifest: Manifest, *, keep: list[Manifest]) -> None:
        return None  # the slot's files are what runs

    def activate(self, slot_dir: Path, manifest: Manifest) -> None:
        return None  # the active-slot pointer is the switch: the local API follows it

    def stop(self, slot_dir: Path, manifest: Manifest) -> None:
        return None  # loaded on demand by the local API; nothing runs on its own

    def health_check(self, slot_dir: Path, manifest: Manifest) -> HealthReport:
        return health_check(slot_dir, ram_limit_mb=self.ram_limit_mb)


def onnx_health_check(bundle_dir: Path) -> HealthReport:
    """Load the model and run its golden set at batch 1: outputs within `atol`, same top-1
    class, p95 latency under the manifest's limit (a detector: its golden boxes found again,
    `_detector_health_check`)."""
    rss_before = rss_mb()
    model = OnnxModel(bundle_dir)
    spec = model.manifest.golden
    try:
        golden = load_golden(bundle_dir, model.manifest)
    except BundleError as exc:
        raise HealthCheckFailed(str(exc)) from exc
    if model.manifest.detection is not None:
        return _detector_health_check(model, golden.inputs, golden.outputs, rss_before)
    outputs, latencies = [], []
    try:
        model.run(golden.inputs[:1])  # warm-up, not timed
        for x in golden.inputs:
            t0 = time.perf_counter()
            outputs.append(model.run(x[None])[0])
            latencies.append((time.perf_counter() - t0) * 1000)
    except Exception as exc:
        raise HealthCheckFailed(f"inference failed on the golden set: {exc}") from exc
    got = np.stack(outputs).astype(np.float32)
    if got.shape != golden.outputs.shape:
        return HealthReport(False, float("inf"), 0.0, 0.0,
                            f"output shape {got.shape} != expected {golden.outputs.shape}")
    diff = float(np.max(np.abs(got - golden.outputs)))
    agree = float(np.mean(got.argmax(-1) == golden.outputs.argmax(-1))) if got.ndim == 2 else 1.0
    p95 = float(np.percentile(latencies, 95))
    memory = rss_mb() - rss_before if rss_before is not None else None
    reasons = []
    if not np.isfinite(diff) or diff > spec.atol:
        reasons.append(f"outputs differ from the golden set by {diff:.4g} > atol {spec.atol:g}")
    if agree < 1.0:
        reasons.append(f"top-1 class agrees on only {agree:.0%} of golden inputs")
    if p95 > spec.max_latency_ms:
        reasons.append(f"p95 latency {p95:.1f} ms > limit {spec.max_latency_ms:g} ms")
    return HealthReport(not reasons, diff, agree, p95, "; ".join(reasons) or "ok",
                        memory_mb=round(memory, 2) if memory is not None else None)


def _detector_health_check(model: OnnxModel, inputs: np.ndarray, expected: np.ndarray,
                           rss_before: float | None) -> HealthReport:
    """Run each golden image at batch 1 and match the boxes found with the golden boxes
    (`_detect`): recall and precision at the manifest's bars, p95 latency under its limit."""
    spec = model.manifest.detection
    assert spec is not None
    found, latencies = [], []
    try:
        model.detect(inputs[:1])  # warm-up, not timed
        for x in inputs:
            t0 = time.perf_counter()
            found.append(model.detect(x[None]))
            latencies.append((time.perf_counter() - t0) * 1000)
    except Exception as exc:
        raise HealthCheckFailed(f"inference failed on the golden images: {exc}") from exc
    m = golden_box_agreement(expected, found, spec)
    p95 = float(np.percentile(latencies, 95))
    memory = rss_mb() - rss_before if rss_before is not None else None
    reasons = []
    if not m["golden_boxes"]:
        reasons.append(f"the golden images hold no box scoring >= {spec.min_score:g}: the "
                       "check would prove nothing")
    elif m["recall"] < spec.min_recall:
        reasons.append(f"found {m['found']} of {m['golden_boxes']} golden boxes (recall "
                       f"{m['recall']:.0%} < {spec.min_recall:.0%} at IoU "
                       f">= {spec.iou_threshold:g}, same label)")
    if m["precision"] < spec.min_precision:
        reasons.append(f"only {m['true_detections']} of {m['detections']} detections are "
                       f"golden boxes (precision {m['precision']:.0%} < "
                       f"{spec.min_precision:.0%})")
    if p95 > model.manifest.golden.max_latency_ms:
        reasons.append(f"p95 latency {p95:.1f} ms > limit "
                       f"{model.manifest.golden.max_latency_ms:g} ms")
    # The rollout gates read `top1_agreement` as "agrees with the golden set": for a
    # detector, the weaker of recall and precision.
    return HealthReport(not reasons, m["max_shift_px"], min(m["recall"], m["precision"]), p95,
                        "; ".join(reasons) or "ok",
                        memory_mb=round(memory, 2) if memory is not None else None,
                        extra={k: round(v, 4) if isinstance(v, float) else v
                               for k, v in m.items()})
