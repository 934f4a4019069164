"""Train the CenterNet detector on a CPU: a short, budgeted loop with transfer learning.

Reads top to bottom: data (resize to the input size, stratified split), targets (CenterNet's
Gaussian heatmaps), loss, the loop (backbone frozen for the first part of the budget, then its
later blocks fine-tuned), validation mAP (pycocotools) with the best weights kept, and the
outputs: `best.pt` (self-describing checkpoint), `model.onnx` (decoding and NMS inside, checked
against torch), `detector.json` (its input/output contract and class names), `metrics.json`,
`config.json`.

Invariant: `train_detector` writes its outputs only after training finished and the exported
ONNX reproduced the torch model's boxes on validation images; the shared helpers (time parsing,
free-core count, learning-rate shape, atomic checkpoint writes) come from `ml.train`.
"""

from __future__ import annotations

import json
import os
import shutil
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
from ..train import _free_cores, _lr_factor, _save_atomic
from ._data import DetectionDataset, detection_split, detection_stats, load_detection_dataset
from ._eval import Detections, evaluate_detections
from ._model import STRIDE, CenterNetDetector, export_detector_onnx, onnx_detect

__all__ = ["DetectConfig", "DetectResult", "detector_contract", "predict", "resize_dataset",
           "train_detector"]

ProgressFn = Callable[[str, float, float], None]
_BOX_PARITY_PX = 0.05


@dataclass(frozen=True)
class DetectConfig:
    data: str
    out_dir: str
    input_size: int = 160  # square, a multiple of 32
    time_budget_s: float = 120.0
    max_steps: int | None = None  # stop after this many steps even with budget left
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    frozen_frac: float = 0.3  # share of the budget with the whole backbone frozen (pretrained)
    trainable_from_block: int = 5  # then blocks from here (stride 16 and up) are fine-tuned
    val_fraction: float = 0.2
    val_every_s: float = 60.0
    pretrained: bool = True
    hflip: bool = True
    max_detections: int = 50
    score_threshold: float = 0.05  # low, as mAP wants the whole precision-recall curve
    seed: int = 0


@dataclass(frozen=True)
class DetectResult:
    out_dir: Path
    model: CenterNetDetector
    metrics: dict[str, Any]


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


def _normalise(images: np.ndarray, model: CenterNetDetector) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> the contract's float [B, 3, H, W]."""
    x = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255
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


def _hflip(images: np.ndarray, boxes: list[np.ndarray], rng: np.random.Generator):
    """Mirror a random half of the batch, boxes with their images."""
    images, boxes = images.copy(), list(boxes)
    w = images.shape[2]
    for b in np.flatnonzero(rng.random(len(images)) < 0.5):
        images[b] = images[b, :, ::-1]
        bb = boxes[b].copy()
        bb[:, [0, 2]] = w - boxes[b][:, [2, 0]]
        boxes[b] = bb
    return images, boxes


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


def train_detector(cfg: DetectConfig, *, progress: ProgressFn | None = None,
                   dataset: DetectionDataset | None = None) -> DetectResult:
    """Train, validate, export; `dataset` overrides reading `cfg.data` (tests, synthetic)."""
    report = progress or (lambda *_: None)
    if cfg.input_size % 32 or not 64 <= cfg.input_size <= 640:
        raise MLError(f"input size must be a multiple of 32 in 64..640, not {cfg.input_size}")
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MLError(f"{out_dir} exists and is not empty; choose a new folder")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    torch.set_num_threads(_free_cores())

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
    _set_backbone_trainable(model, trainable_from)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    start = time.monotonic()
    step, best, best_state, history = 0, -1.0, None, []
    last_val = start
    while True:
        elapsed = time.monotonic() - start
        frac = elapsed / cfg.time_budget_s
        if cfg.max_steps is not None:
            frac = max(frac, step / cfg.max_steps)
        if frac >= 1.0:
            break
        if trainable_from is None and frac >= cfg.frozen_frac:
            trainable_from = cfg.trainable_from_block
            _set_backbone_trainable(model, trainable_from)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(frac)
        pick = rng.choice(len(train_ds), size=min(cfg.batch_size, len(train_ds)), replace=False)
        images = train_images[pick]
        boxes = [train_ds.boxes[i] for i in pick]
        if cfg.hflip:
            images, boxes = _hflip(images, boxes, rng)
        heat_t, box_t, mask = _targets(boxes, [train_ds.labels[i] for i in pick], num_classes,
                                       cfg.input_size)
        heat, box = model(_normalise(images, model))
        loss, parts = _loss(heat, box, heat_t, box_t, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        report("train detector", min(frac, 1.0) * 100, 100)
        if time.monotonic() - last_val >= cfg.val_every_s:
            best, best_state = _validate(model, val_ds, step, parts, history, best, best_state)
            _set_backbone_trainable(model, trainable_from)  # eval() above reset BN modes
            last_val = time.monotonic()
    best, best_state = _validate(model, val_ds, step, {}, history, best, best_state)
    model.load_state_dict(best_state)
    model.eval()
    train_s = time.monotonic() - start

    # outputs: all written to a temporary sibling folder that becomes out_dir only once the
    # ONNX export reproduced torch, so a failed run leaves nothing half-written
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        onnx_path = export_detector_onnx(model, tmp / "model.onnx")
        parity_px = _check_onnx(model, onnx_path, val_ds)
        final = evaluate_detections(val_ds, predict(model, val_ds))
        metrics = {"val_map50": final["map50"], "val_map50_95": final["map50_95"],
                   "per_class": final["per_class"], "steps": step,
                   "train_s": round(train_s, 1), "onnx_box_parity_px": parity_px,
                   "history": history, "train_images": len(train_ds),
                   "val_images": len(val_ds), "val_stats": detection_stats(val_ds)}
        _save_atomic({"state_dict": model.state_dict(), "class_names": list(full.class_names),
                      "config": asdict(cfg),
                      "metrics": {k: metrics[k] for k in ("val_map50", "val_map50_95", "steps")}},
                     tmp / "best.pt")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        (tmp / "detector.json").write_text(json.dumps(detector_contract(model, full.class_names),
                                                      indent=1))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked at the start
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DetectResult(out_dir, model, metrics)


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


def _validate(model, val_ds, step, parts, history, best, best_state):
    m = evaluate_detections(val_ds, predict(model, val_ds))
    history.append({"step": step, "val_map50": m["map50"], "val_map50_95": m["map50_95"],
                    **parts})
    if m["map50"] >= best:  # ties: the later, longer-trained weights
        best = m["map50"]
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return best, best_state
