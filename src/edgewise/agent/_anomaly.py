"""On-device anomaly / drift aggregates and generation from a generator bundle.

Invariant: only aggregates leave this module (per-hour counts, share anomalous, a score
histogram over the bundle's fixed bins); no image, score of a single image or timestamp finer
than the hour is ever written to the drift file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import BundleManifest, DetectorSpec
from ._errors import AgentConfigError, AgentTransportError, NoModelError
from ._store import atomic_write_json

__all__ = ["DRIFT_FILE", "LOCAL_DETECTOR_FILE", "DriftLog", "flush_drift", "generate_images",
           "image_grid_png", "learn_normal", "local_threshold"]

DRIFT_FILE = "drift.json"
DRIFT_SENT_FILE = "drift-sent.json"  # what was last reported, and when
# Beside the slots, not inside one: an update replaces slots but keeps this file.
LOCAL_DETECTOR_FILE = "detector-local.json"
MIN_LEARN_IMAGES = 50
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
_KEEP_HOURS = 48
_lock = threading.Lock()
log = logging.getLogger("edgewise.agent.drift")


class DriftLog:
    """Per-hour aggregates of the anomaly score, in `STATE/drift.json` (atomic writes)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / DRIFT_FILE

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def record(self, score: float, spec: DetectorSpec, release: str,
               now: datetime | None = None, threshold: float | None = None) -> None:
        hour = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:00Z")
        with _lock:
            data = self._load()
            if data.get("release") != release or data.get("edges") != list(
                    spec.histogram_edges):
                # a new detector means new bins and a new threshold: start over
                data = {"release": release, "threshold": spec.threshold,
                        "target_fpr": spec.target_fpr, "edges": list(spec.histogram_edges),
                        "hours": {}}
            hours = data["hours"]
            row = hours.setdefault(hour, {"n": 0, "anomalous": 0,
                                          "histogram": [0] * (len(spec.histogram_edges) + 1)})
            row["n"] += 1
            row["anomalous"] += int(score > (spec.threshold if threshold is None
                                             else threshold))
            row["histogram"][int(np.searchsorted(spec.histogram_edges, score, side="right"))] += 1
            for old in sorted(hours)[:-_KEEP_HOURS]:
                del hours[old]
            atomic_write_json(self.path, data)

    def summary(self) -> dict[str, Any] | None:
        """What may be reported: totals, share anomalous per hour, the summed histogram."""
        data = self._load()
        if not data.get("hours"):
            return None
        hours = data["hours"]
        n = sum(h["n"] for h in hours.values())
        bad = sum(h["anomalous"] for h in hours.values())
        hist = np.sum([h["histogram"] for h in hours.values()], axis=0).tolist()
        return {"release": data["release"], "inputs": n, "anomalous": bad,
                "share_anomalous": round(bad / n, 4) if n else 0.0,
                "expected_share": data["target_fpr"], "threshold": data["threshold"],
                "histogram_edges": data["edges"], "histogram": hist,
                "per_hour": {k: {"n": v["n"], "share_anomalous": round(v["anomalous"] / v["n"], 4)}
                             for k, v in sorted(hours.items())}}


def flush_drift(state_dir: Path, client, installed, *, min_interval_s: float,
                now: float | None = None) -> bool:
    """Report the drift aggregates of the installed release to the server when they changed,
    at most every `min_interval_s`; a dropped connection is retried on a later cycle. Only
    `DriftLog.summary()` leaves the device."""
    summary = DriftLog(state_dir).summary()
    if summary is None or installed is None or summary["release"] != installed.label:
        return False
    body = {"release_id": installed.release_id, "inputs": summary["inputs"],
            "anomalous": summary["anomalous"], "expected_share": summary["expected_share"],
            "histogram_edges": summary["histogram_edges"], "histogram": summary["histogram"],
            "per_hour": summary["per_hour"]}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    sent_path = Path(state_dir) / DRIFT_SENT_FILE
    try:
        sent = json.loads(sent_path.read_text())
    except (OSError, ValueError):
        sent = {}
    now = time.time() if now is None else now
    if sent.get("digest") == digest or now - float(sent.get("at", 0)) < min_interval_s:
        return False
    try:
        client.drift(body)
    except AgentTransportError as exc:
        if exc.status_code is None or exc.status_code >= 500:
            return False  # offline: the next cycle tries again
        log.warning("server refused the drift report, not resending it: %s", exc)
    atomic_write_json(sent_path, {"digest": digest, "at": now})
    return True


def generate_images(bundle_dir: Path, manifest: BundleManifest, *, label: str | None, n: int,
                    seed: int = 0, threads: int = 1) -> tuple[np.ndarray, float]:
    """Sample `n` images [n, H, W] in [0, 1] from the bundle's decoder; returns them and the
    wall time of the decoder run in milliseconds."""
    import onnxruntime as ort

    spec = manifest.generator
    if spec is None:
        raise NoModelError(f"{manifest.release_name} has no generator (it is a "
                           f"{manifest.kind})")
    feeds: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    feeds["z"] = rng.standard_normal((n, spec.latent_dim)).astype(np.float32)
    if spec.conditional:
        if label is None:
            raise AgentConfigError(f"this generator is class-conditional: pass a class "
                                   f"({', '.join(manifest.labels)})")
        matches = [i for i, name in enumerate(manifest.labels)
                   if name.lower() == label.lower() or name.lower().split("/")[0]
                   == label.lower()]
        if not matches:
            raise AgentConfigError(f"unknown class {label!r} (one of "
                                   f"{', '.join(manifest.labels)})")
        feeds["label"] = np.zeros((n, len(manifest.labels)), np.float32)
        feeds["label"][:, matches[0]] = 1.0
    elif label is not None:
        raise AgentConfigError("this generator is not class-conditional; omit --class")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(Path(bundle_dir) / spec.model), opts,
                                providers=["CPUExecutionProvider"])
    sess.run(None, {k: v[:1] for k, v in feeds.items()})  # warm-up, not timed
    t0 = time.perf_counter()
    images = sess.run(None, feeds)[0]
    ms = (time.perf_counter() - t0) * 1e3
    return np.asarray(images)[:, 0], ms


def denoise_images(bundle_dir: Path, manifest: BundleManifest, images: np.ndarray, *,
                   sigma: float, threads: int = 1) -> tuple[np.ndarray, float]:
    """Denoise images [N, H, W] in [0, 1] carrying Gaussian noise of std `sigma` (same units)
    with the bundle's denoiser; returns the estimates and the wall time in milliseconds."""
    import onnxruntime as ort

    spec = manifest.generator
    if spec is None or spec.denoiser is None:
        raise NoModelError(f"{manifest.release_name} has no denoiser (train one with "
                           "`edgewise gen train --kind ddpm`)")
    if not 0 < sigma <= 1:
        raise AgentConfigError("sigma (the noise's standard deviation, pixels in [0, 1]) must "
                               "be in (0, 1]")
    h, w = manifest.preprocessing.input_size
    if images.ndim != 3 or images.shape[1:] != (h, w):
        raise AgentConfigError(f"images must be {h}x{w} (this denoiser's size); got "
                               f"{images.shape[1:]}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(Path(bundle_dir) / spec.denoiser), opts,
                                providers=["CPUExecutionProvider"])
    noisy = images.astype(np.float32)[:, None]
    t0 = time.perf_counter()
    clean = sess.run(None, {"noisy": noisy, "sigma": np.full(len(noisy), sigma, np.float32)})[0]
    return np.asarray(clean)[:, 0], (time.perf_counter() - t0) * 1e3


def image_grid_png(images: np.ndarray, path: Path, cols: int | None = None,
                   scale: int = 2) -> None:
    """[N, H, W] in [0, 1] -> a grayscale PNG grid (upscaled `scale` times, to be seen)."""
    from PIL import Image

    n, h, w = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y, x = 2 + r * (h + 2), 2 + c * (w + 2)
        grid[y:y + h, x:x + w] = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    out = Image.fromarray(grid, mode="L")
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


def detector_identity(manifest: BundleManifest) -> str | None:
    """What a locally fitted threshold belongs to: the detector graph's signed hash (and its
    output), so an update that ships the same detector keeps the device's own threshold."""
    spec = manifest.detector
    entry = manifest.files.get(spec.model) if spec is not None else None
    return f"{entry.sha256}:{spec.output}" if entry is not None else None


def local_threshold(state_dir: Path, release: str, detector: str | None = None
                    ) -> float | None:
    """The threshold `learn-normal` fitted on this device for this detector (or, for files
    written before detectors were identified, this release), if any."""
    try:
        data = json.loads((Path(state_dir) / LOCAL_DETECTOR_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    same = (data.get("detector") == detector if data.get("detector") and detector
            else data.get("release") == release)
    if not same:
        return None  # fitted for another detector: its scores are on another scale
    value = data.get("threshold")
    return float(value) if isinstance(value, int | float) else None


def learn_normal(state_dir: Path, model: Any, image_dir: Path, *, target_fpr: float,
                 time_budget_s: float) -> dict[str, Any]:
    """Re-calibrate the active detector's threshold on this device's own (normal) images.

    Scores as many images of `image_dir` as the time budget allows and sets the threshold so
    that `target_fpr` of them would be flagged. Only the threshold and counts are stored.
    """
    from ._runtime import preprocess_image

    spec = model.manifest.detector
    if spec is None:
        raise NoModelError(f"{model.manifest.release_name} has no anomaly detector")
    if not 0 < target_fpr < 1:
        raise AgentConfigError("target FPR must be between 0 and 1")
    paths = sorted(p for p in Path(image_dir).rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    t0 = time.monotonic()
    scores, skipped = [], 0
    for path in paths:
        if time.monotonic() - t0 > time_budget_s:
            break
        try:
            x = preprocess_image(path.read_bytes(), model.manifest.preprocessing)
        except (OSError, ValueError):
            skipped += 1
            continue
        scores.append(model.anomaly(x)["score"])
    if len(scores) < MIN_LEARN_IMAGES:
        raise AgentConfigError(f"need at least {MIN_LEARN_IMAGES} readable images, scored "
                               f"{len(scores)} of {len(paths)} in {time_budget_s:g} s")
    arr = np.asarray(scores, np.float64)
    threshold = float(np.quantile(arr, 1.0 - target_fpr))
    result = {"release": model.manifest.release_name,
              "detector": detector_identity(model.manifest), "threshold": threshold,
              "target_fpr": target_fpr, "images": len(scores), "skipped": skipped,
              "shipped_threshold": spec.threshold,
              "shipped_threshold_flags": round(float((arr > spec.threshold).mean()), 4),
              "seconds": round(time.monotonic() - t0, 2),
              "fitted_at": datetime.now(UTC).isoformat(timespec="seconds")}
    atomic_write_json(Path(state_dir) / LOCAL_DETECTOR_FILE, result)
    return result
