"""Train the CenterNet detector on a CPU: a short, budgeted loop with transfer learning.

Reads top to bottom: data (resize to the input size, stratified split), targets (CenterNet's
Gaussian heatmaps), loss, the loop (backbone frozen for the first part of the budget, then its
later blocks fine-tuned), validation mAP (pycocotools) with the best weights kept, and the
outputs: `best.pt` (self-describing checkpoint), `model.onnx` (decoding and NMS inside, checked
against torch), `detector.json` (its input/output contract and class names), `metrics.json`,
`config.json`, `val_detections.png` (validation images with the boxes found and the true
ones), and `bundle/` (what devices install: `_bundle`).

Invariant: `train_detector` writes its outputs only after training finished and the exported
ONNX reproduced the torch model's boxes on validation images; until then OUT holds only the
resume checkpoint `last.pt` (at most `_CHECKPOINT_EVERY_S` old) and the MLflow store. The
shared pieces (time parsing, free-core count, learning-rate shape, atomic checkpoint writes,
the MLflow seam) come from `ml.train` and `ml.tracking`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ExportError, MLError
from ..tracking import Tracker, default_tracking_uri
from ..train import (
    _CHECKPOINT_EVERY_S,
    _EMA,
    _EMA_DECAY,
    _bundle_name,
    _free_cores,
    _lr_factor,
    _save_atomic,
)
from ._augment import DETECT_AUGMENT_PRESETS, augment_detection_batch
from ._bundle import write_detector_bundle
from ._data import DetectionDataset, detection_split, detection_stats, load_detection_dataset
from ._eval import Detections, evaluate_detections
from ._model import STRIDE, CenterNetDetector, export_detector_onnx, onnx_detect
from ._report import detections_png

__all__ = ["DetectConfig", "DetectResult", "detector_contract", "predict", "resize_dataset",
           "train_detector"]

ProgressFn = Callable[[str, float, float], None]
NotifyFn = Callable[[str], None]
_BOX_PARITY_PX = 0.05
_LAST_CHECKPOINT = "last.pt"  # in OUT while a run is unfinished; gone once it completed
_TRACKING_STORE = ("mlflow.db", "mlartifacts")  # `ml.tracking`'s default store in OUT
_VAL_PNG = "val_detections.png"  # validation images: found boxes (colour) and true (white)
# What must stay equal for `resume` to continue a run rather than start a different one.
_RESUME_KEYS = ("data", "input_size", "batch_size", "lr", "weight_decay", "frozen_frac",
                "trainable_from_block", "val_fraction", "pretrained", "augment",
                "max_detections", "score_threshold", "ema", "seed")


@dataclass(frozen=True)
class DetectConfig:
    data: str
    out_dir: str
    input_size: int = 160  # square, a multiple of 32
    time_budget_s: float = 120.0
    max_steps: int | None = None  # stop after this many steps even with budget left
    # 8, not 16: twice the steps for the same images and time; at a 3-minute budget (1 thread)
    # validation mAP@0.5 rose 2.9 points with the default augmentation, 3.7 with flips only.
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    frozen_frac: float = 0.3  # share of the budget with the whole backbone frozen (pretrained)
    trainable_from_block: int = 5  # then blocks from here (stride 16 and up) are fine-tuned
    val_fraction: float = 0.2
    val_every_s: float = 60.0
    pretrained: bool = True
    augment: str = "default"  # DETECT_AUGMENT_PRESETS: default (flip, zoom, shift, colour),
    # flip, none
    max_detections: int = 50
    score_threshold: float = 0.05  # low, as mAP wants the whole precision-recall curve
    ema: bool = False  # validate and export an exponential moving average of the weights
    seed: int = 0
    name: str | None = None  # bundle name; default: from the data folder
    version: str = "1.0.0"
    bundle_min_score: float = 0.3  # detections the device serves and its health check matches
    track: bool = False  # MLflow (the CLI turns it on)
    tracking_uri: str | None = None  # default: sqlite store in out_dir
    stop_after_steps: int | None = None  # pause (checkpoint, no export); `resume` continues
    resume: bool = False
    threads: int | None = None  # torch threads; default: the cores other work leaves free


@dataclass(frozen=True)
class DetectResult:
    out_dir: Path
    model: CenterNetDetector
    metrics: dict[str, Any]
    bundle_dir: Path | None = None
    paused: bool = False


# ---- data -----------------------------------------------------------------------------------

def resize_dataset(dataset: DetectionDataset, size: int) -> DetectionDataset:
    """Every image resized to size x size (bilinear), its boxes scaled with it."""
    from PIL import Image

    images, boxes = [], []
    for image, bb in zip(dataset.images, dataset.boxes, strict=True):
        h, w = image.shape[:2]
        if (h, w) != (size, size):
            image = np.asarray(Image.fromarray(image).resize((size, size),
                                                             Image.Resampling.BILINEAR))
            bb = bb * np.array([size / w, size / h, size / w, size / h], np.float32)
        images.append(image)
        boxes.append(bb)
    return DetectionDataset(tuple(images), tuple(boxes), dataset.labels, dataset.class_names,
                            dataset.file_names, dataset.source)


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1] (what augmentation works on)."""
    return torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255


def _normalise(images: np.ndarray, model: CenterNetDetector) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> the contract's float [B, 3, H, W]."""
    return _standardise(_to_unit(images), model)


def _standardise(x: torch.Tensor, model: CenterNetDetector) -> torch.Tensor:
    mean = torch.tensor(model.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


# ---- targets and loss -----------------------------------------------------------------------

def _targets(boxes: list[np.ndarray], labels: list[np.ndarray], num_classes: int, size: int):
    """CenterNet targets: per-class heatmaps with an elliptic Gaussian at every object centre
    (TTFNet's sigma = 0.54 * side / 6), and at each centre cell the box target (offset of the
    centre inside the cell, log width and height in stride units)."""
    g = size // STRIDE
    heat = np.zeros((len(boxes), num_classes, g, g), np.float32)
    box = np.zeros((len(boxes), 4, g, g), np.float32)
    mask = np.zeros((len(boxes), g, g), np.float32)
    ys, xs = np.mgrid[0:g, 0:g].astype(np.float32)
    for b, (bb, lab) in enumerate(zip(boxes, labels, strict=True)):
        # Larger objects first, so a small object's centre target wins a shared cell.
        for i in np.argsort(-(bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1])):
            x1, y1, x2, y2 = bb[i] / STRIDE
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            ix, iy = min(int(cx), g - 1), min(int(cy), g - 1)
            sx, sy = max(0.54 * (x2 - x1) / 6, 0.3), max(0.54 * (y2 - y1) / 6, 0.3)
            gauss = np.exp(-((xs - ix) ** 2 / (2 * sx ** 2) + (ys - iy) ** 2 / (2 * sy ** 2)))
            np.maximum(heat[b, lab[i]], gauss, out=heat[b, lab[i]])
            box[b, :, iy, ix] = (cx - ix, cy - iy, np.log(max(x2 - x1, 1e-3)),
                                 np.log(max(y2 - y1, 1e-3)))
            mask[b, iy, ix] = 1.0
    return torch.from_numpy(heat), torch.from_numpy(box), torch.from_numpy(mask)


def _loss(heat_logits, box_pred, heat_t, box_t, mask) -> tuple[torch.Tensor, dict[str, float]]:
    """CenterNet's penalty-reduced focal loss plus L1 on the box terms at object centres."""
    p = heat_logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = heat_t.eq(1).float()
    n_pos = pos.sum().clamp(min=1)
    focal = -(pos * (1 - p) ** 2 * p.log()
              + (1 - pos) * (1 - heat_t) ** 4 * p ** 2 * (1 - p).log()).sum() / n_pos
    m = mask[:, None]
    l1 = F.l1_loss(box_pred * m, box_t * m, reduction="sum") / (mask.sum().clamp(min=1) * 4)
    return focal + l1, {"focal": float(focal.detach()), "box_l1": float(l1.detach())}


# ---- evaluation -----------------------------------------------------------------------------

@torch.no_grad()
def predict(model: CenterNetDetector, dataset: DetectionDataset) -> list[Detections]:
    was_training = model.training
    model.eval()
    out = []
    for image in dataset.images:
        boxes, scores, labels = model(_normalise(image[None], model))
        out.append(Detections(boxes.numpy(), scores.numpy(), labels.numpy()))
    model.train(was_training)
    return out


def _check_onnx(model: CenterNetDetector, path: Path, dataset: DetectionDataset) -> float:
    """Max box difference (pixels) between onnxruntime and torch on up to 4 images."""
    worst = 0.0
    model.eval()
    for image in dataset.images[:4]:
        x = _normalise(image[None], model)
        with torch.no_grad():
            tb, ts, tl = (t.numpy() for t in model(x))
        ob, os_, ol = onnx_detect(path, x.numpy())
        if ob.shape != tb.shape or not np.array_equal(ol, tl):
            raise ExportError(f"{path}: ONNX gives {len(ob)} detections, torch {len(tb)} "
                              "(or other labels)")
        if len(tb):
            worst = max(worst, float(np.abs(ob - tb).max()), float(np.abs(os_ - ts).max()))
    if worst > _BOX_PARITY_PX:
        raise ExportError(f"{path}: ONNX boxes differ from torch by {worst:.3f} px")
    return worst


# ---- the loop -------------------------------------------------------------------------------

def _set_backbone_trainable(model: CenterNetDetector, from_block: int | None) -> None:
    """None: all frozen (BatchNorm statistics too); else blocks >= from_block train (-1: the
    stem too)."""
    parts = model.backbone_modules()  # [stem, block 0, block 1, ...]
    for i, part in enumerate(parts):
        train = from_block is not None and i - 1 >= from_block
        for p in part.parameters():
            p.requires_grad_(train)
        part.train(train and model.training)


def _check_out_dir(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); refuses a folder that holds
    anything else, and a finished or foreign folder for --resume."""
    last = out_dir / _LAST_CHECKPOINT
    if resume:
        if not last.is_file():
            raise MLError(f"nothing to resume: {last} does not exist")
        return last
    if last.is_file():
        raise MLError(f"{out_dir} holds an unfinished run; continue it with --resume or "
                      "choose another --out")
    # A run stopped before its first checkpoint leaves only the MLflow store: a new run
    # starts there (and adds its own MLflow run).
    if out_dir.exists() and any(p.name not in _TRACKING_STORE for p in out_dir.iterdir()):
        raise MLError(f"{out_dir} exists and is not empty; choose a new folder")
    return None


def train_detector(cfg: DetectConfig, *, progress: ProgressFn | None = None,
                   notify: NotifyFn | None = None,
                   dataset: DetectionDataset | None = None) -> DetectResult:
    """Train, validate, export, bundle; `dataset` overrides reading `cfg.data` (tests,
    synthetic). With `cfg.stop_after_steps` it pauses (checkpoint written, nothing exported)
    and `cfg.resume` continues it."""
    report = progress or (lambda *_: None)
    say = notify or (lambda *_: None)
    if cfg.augment not in DETECT_AUGMENT_PRESETS:
        raise MLError(f"unknown augmentation {cfg.augment!r} (known: "
                      f"{', '.join(DETECT_AUGMENT_PRESETS)})")
    if cfg.input_size % 32 or not 64 <= cfg.input_size <= 640:
        raise MLError(f"input size must be a multiple of 32 in 64..640, not {cfg.input_size}")
    out_dir = Path(cfg.out_dir)
    resume_from = _check_out_dir(out_dir, cfg.resume)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    torch.set_num_threads(cfg.threads or _free_cores())

    # data
    full = resize_dataset(dataset or load_detection_dataset(cfg.data), cfg.input_size)
    tr_idx, va_idx = detection_split(full, cfg.val_fraction, cfg.seed)
    train_ds, val_ds = full.subset(tr_idx), full.subset(va_idx)
    train_images = np.stack(train_ds.images)
    num_classes = len(full.class_names)

    # model: backbone frozen first (only the neck and head learn), then later blocks too
    model = CenterNetDetector(num_classes, input_size=(cfg.input_size, cfg.input_size),
                              pretrained=cfg.pretrained, max_detections=cfg.max_detections,
                              score_threshold=cfg.score_threshold)
    model.train()
    # A random backbone has nothing worth freezing: from scratch, all of it trains (stem too).
    trainable_from: int | None = None if cfg.pretrained else -1
    if not cfg.pretrained:
        # TensorFlow's BatchNorm momentum (0.01) suits fine-tuning ImageNet statistics; from
        # random weights a short run's running statistics would stay near their start, and
        # the eval-mode network (validation, ONNX) would answer the same for every image.
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    step, trained_s, best, best_state, history = 0, 0.0, -1.0, None, []
    if resume_from is not None:
        ck = torch.load(resume_from, map_location="cpu", weights_only=True)
        saved = json.loads(ck["config_json"])
        diff = [k for k in _RESUME_KEYS if saved.get(k) != asdict(cfg).get(k)]
        if diff:
            raise MLError(f"cannot resume: the run was started with other settings ({diff})")
        trainable_from = ck["trainable_from"]
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        rng.bit_generator.state = json.loads(ck["numpy_rng_json"])
        state = json.loads(ck["state_json"])
        step, trained_s, best, history = (state["step"], state["trained_s"], state["best"],
                                          state["history"])
        best_state = ck.get("best_state")
        say(f"resumed after step {step} ({trained_s:.0f} s trained)")
    _set_backbone_trainable(model, trainable_from)
    ema = _EMA(model, _EMA_DECAY) if cfg.ema else None
    if ema is not None and resume_from is not None:
        ema.module.load_state_dict(ck["ema"])
        ema.updates = int(ck["ema_updates"])

    # tracking: the classifier's MLflow seam, its store under OUT by default
    tracker: Tracker | None = None
    if cfg.track:
        out_dir.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(cfg.tracking_uri or default_tracking_uri(out_dir), out_dir,
                          run_name=f"detect-{_name(cfg)}-{cfg.version}").__enter__()
        tracker.log_params({**{k: v for k, v in asdict(cfg).items() if v is not None},
                            "task": "detect", "train_images": len(train_ds),
                            "val_images": len(val_ds), "resumed_at_step": step})
    try:
        state = {"step": step, "trained_s": trained_s, "best": best, "best_state": best_state,
                 "history": history, "trainable_from": trainable_from, "ema": ema}
        paused = _loop(cfg, model, opt, train_ds, val_ds, train_images, num_classes, rng,
                       tracker, report, say, out_dir, state)
        if paused:
            if tracker is not None:
                tracker.__exit__(None, None, None)
            say(f"paused after step {state['step']}; continue with --resume")
            return DetectResult(out_dir, model, {"steps": state["step"],
                                                 "history": state["history"]}, paused=True)
        result = _finish(cfg, model, full, val_ds, state, out_dir, tracker, report, say)
    except BaseException:
        if tracker is not None:
            tracker.__exit__(*sys.exc_info())
        raise
    if tracker is not None:
        tracker.__exit__(None, None, None)
    return result


def _loop(cfg: DetectConfig, model: CenterNetDetector, opt, train_ds, val_ds, train_images,
          num_classes: int, rng: np.random.Generator, tracker: Tracker | None,
          report: ProgressFn, say: NotifyFn, out_dir: Path, state: dict[str, Any]) -> bool:
    """Train in place until the budget (or max_steps) is spent; `state` carries step, trained
    seconds, best mAP and weights, history. Returns whether it paused (stop_after_steps)."""
    start = time.monotonic() - state["trained_s"]
    last_val = last_save = time.monotonic()
    trainable_from = state["trainable_from"]
    augment = DETECT_AUGMENT_PRESETS[cfg.augment]
    while True:
        elapsed = time.monotonic() - start
        frac = elapsed / cfg.time_budget_s
        if cfg.max_steps is not None:
            frac = max(frac, state["step"] / cfg.max_steps)
        if frac >= 1.0:
            break
        if trainable_from is None and frac >= cfg.frozen_frac:
            trainable_from = state["trainable_from"] = cfg.trainable_from_block
            _set_backbone_trainable(model, trainable_from)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(frac)
        pick = rng.choice(len(train_ds), size=min(cfg.batch_size, len(train_ds)), replace=False)
        x = _to_unit(train_images[pick])
        boxes = [train_ds.boxes[i] for i in pick]
        labels = [train_ds.labels[i] for i in pick]
        if augment != DETECT_AUGMENT_PRESETS["none"]:
            # One seed per step from the run's generator: a resumed run draws the same.
            gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
            x, boxes, labels = augment_detection_batch(x, boxes, labels, augment, gen)
        heat_t, box_t, mask = _targets(boxes, labels, num_classes, cfg.input_size)
        # NHWC in memory, as `_to_unit` leaves a batch: oneDNN's convolutions run a step ~1.5x
        # faster on it (1 thread) than on the NCHW copy that `grid_sample` returns.
        x = x.contiguous(memory_format=torch.channels_last)
        heat, box = model(_standardise(x, model))
        loss, parts = _loss(heat, box, heat_t, box_t, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if state["ema"] is not None:
            state["ema"].update(model)
        state["step"] += 1
        state["trained_s"] = time.monotonic() - start
        report("train detector", min(frac, 1.0) * 100, 100)
        if time.monotonic() - last_val >= cfg.val_every_s:
            _validate(model, val_ds, parts, state, tracker, say)
            _set_backbone_trainable(model, trainable_from)  # eval() above reset BN modes
            last_val = time.monotonic()
        paused = cfg.stop_after_steps is not None and state["step"] >= cfg.stop_after_steps
        if paused or time.monotonic() - last_save >= _CHECKPOINT_EVERY_S:
            _checkpoint(cfg, model, opt, rng, state, out_dir / _LAST_CHECKPOINT)
            last_save = time.monotonic()
        if paused:
            return True
    _validate(model, val_ds, {}, state, tracker, say)
    return False


def _checkpoint(cfg: DetectConfig, model, opt, rng: np.random.Generator,
                state: dict[str, Any], path: Path) -> None:
    """Everything `--resume` needs, written atomically (weights-only loadable: tensors,
    strings, numbers)."""
    ema = state["ema"]
    _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                  **({} if ema is None else {"ema": ema.module.state_dict(),
                                             "ema_updates": ema.updates}),
                  "best_state": state["best_state"], "torch_rng": torch.get_rng_state(),
                  "numpy_rng_json": json.dumps(rng.bit_generator.state),
                  "trainable_from": state["trainable_from"],
                  "config_json": json.dumps(asdict(cfg)),
                  "state_json": json.dumps({k: state[k] for k in
                                            ("step", "trained_s", "best", "history")})}, path)


def _finish(cfg: DetectConfig, model: CenterNetDetector, full: DetectionDataset,
            val_ds: DetectionDataset, state: dict[str, Any], out_dir: Path,
            tracker: Tracker | None, report: ProgressFn, say: NotifyFn) -> DetectResult:
    """Export the best weights, check ONNX against torch, score, bundle, then move the outputs
    into `out_dir` (and drop the resume checkpoint)."""
    model.load_state_dict(state["best_state"])
    model.eval()
    # outputs: written to a temporary sibling folder and moved into out_dir only once the
    # ONNX export reproduced torch, so a failed run leaves nothing half-written
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        report("export", 0, 2)
        onnx_path = export_detector_onnx(model, tmp / "model.onnx")
        parity_px = _check_onnx(model, onnx_path, val_ds)
        val_predictions = predict(model, val_ds)
        final = evaluate_detections(val_ds, val_predictions)
        metrics = {"val_map50": final["map50"], "val_map50_95": final["map50_95"],
                   "per_class": final["per_class"], "steps": state["step"],
                   "train_s": round(state["trained_s"], 1), "onnx_box_parity_px": parity_px,
                   "history": state["history"], "train_images": len(full) - len(val_ds),
                   "val_images": len(val_ds), "val_stats": detection_stats(val_ds)}
        _save_atomic({"state_dict": model.state_dict(), "class_names": list(full.class_names),
                      "config": asdict(cfg),
                      "metrics": {k: metrics[k] for k in ("val_map50", "val_map50_95", "steps")}},
                     tmp / "best.pt")
        contract = detector_contract(model, full.class_names)
        (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        (tmp / "detector.json").write_text(json.dumps(contract, indent=1))
        (tmp / _VAL_PNG).write_bytes(detections_png(val_ds, val_predictions,
                                                    min_score=cfg.bundle_min_score))
        report("export", 1, 2)
        bundle_dir = _bundle(cfg, onnx_path, contract, val_ds, metrics, tmp, tracker, say)
        metrics["bundle"] = str(out_dir / "bundle") if bundle_dir else None
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        report("export", 2, 2)
        for entry in tmp.iterdir():
            os.replace(entry, out_dir / entry.name)
        (out_dir / _LAST_CHECKPOINT).unlink(missing_ok=True)  # complete: a rerun starts afresh
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if tracker is not None:
        tracker.log_metrics({"val_map50": metrics["val_map50"],
                             "val_map50_95": metrics["val_map50_95"],
                             "train_s": metrics["train_s"]}, step=state["step"])
        for name in ("metrics.json", "config.json", "detector.json", _VAL_PNG):
            tracker.log_artifact(out_dir / name)
        if bundle_dir:
            tracker.log_artifact(out_dir / "bundle", "bundle")
    return DetectResult(out_dir, model, metrics,
                        bundle_dir=out_dir / "bundle" if bundle_dir else None)


def _bundle(cfg: DetectConfig, onnx_path: Path, contract: dict[str, Any], val_ds, metrics,
            tmp: Path, tracker: Tracker | None, say: NotifyFn) -> Path | None:
    """`tmp/bundle`, golden images from the validation split; None (with a warning) when the
    detector finds nothing confident there yet."""
    try:
        write_detector_bundle(
            tmp / "bundle", model=onnx_path, contract=contract, images=val_ds.images,
            name=_name(cfg), version=cfg.version, min_score=cfg.bundle_min_score,
            extra_files={_VAL_PNG: tmp / _VAL_PNG},
            metrics={k: metrics[k] for k in ("val_map50", "val_map50_95", "steps",
                                             "train_s", "train_images", "val_images")},
            provenance={"recipe": "edgewise.ml.detect", "dataset": cfg.data,
                        "pretrained": cfg.pretrained, "seed": cfg.seed,
                        "torch_version": torch.__version__,
                        "mlflow_run_id": tracker.run_id if tracker else None})
    except MLError as exc:
        metrics["warnings"] = [f"no bundle written: {exc}"]
        say(f"[bold red]warning:[/] no bundle written: {exc}")
        return None
    return tmp / "bundle"


def _name(cfg: DetectConfig) -> str:
    return cfg.name or (_bundle_name(cfg.data) if cfg.data else "detector")


def detector_contract(model: CenterNetDetector, class_names: tuple[str, ...]) -> dict[str, Any]:
    """What any runtime needs to use `model.onnx`: input and its normalisation, outputs, class
    names (label i is `class_names[i]`)."""
    h, w = model.input_size
    return {"input": {"name": "image", "shape": [1, 3, h, w], "dtype": "float32",
                      "channels": "RGB", "pixels": "x / 255, then (x - mean) / std",
                      "mean": list(model.spec.mean), "std": list(model.spec.std)},
            "outputs": {"boxes": "float32 [N, 4] x1, y1, x2, y2 in input pixels",
                        "scores": "float32 [N], sorted descending",
                        "labels": "int64 [N], index into class_names"},
            "max_detections": model.max_detections, "score_threshold": model.score_threshold,
            "nms_iou": model.nms_iou, "class_names": list(class_names)}


def _validate(model, val_ds, parts: dict[str, float], state: dict[str, Any],
              tracker: Tracker | None, say: NotifyFn) -> None:
    """Score the weights on the validation split (their moving average with `cfg.ema`) and
    keep the best."""
    if state["ema"] is not None:
        model = state["ema"].module
    m = evaluate_detections(val_ds, predict(model, val_ds))
    row = {"step": state["step"], "val_map50": m["map50"], "val_map50_95": m["map50_95"],
           **parts}
    state["history"].append(row)
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=state["step"])
    say(f"step {state['step']}: validation mAP@0.5 {m['map50']:.3f}, mAP@0.5:0.95 "
        f"{m['map50_95']:.3f}")
    if m["map50"] >= state["best"]:  # ties: the later, longer-trained weights
        state["best"] = m["map50"]
        state["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
