"""Synthetic detection scenes: Fashion-MNIST items, scaled and tinted, on textured backgrounds.

This data set is SYNTHETIC and says so: its COCO `info` carries `"synthetic": true`, the
generator, its seed and the Fashion-MNIST split the items come from. It exists because no
detection data set can be downloaded here; figures measured on it are not figures on real
photographs.

Invariant: the same (items, seed, parameters) give byte-identical scenes; every box is the
tight box of the object's visible pixels, and no object is more than `max_occlusion` hidden
by the ones placed after it, so every labelled object can be seen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import FASHION_MNIST_LABELS, FASHION_MNIST_ROOT, load_idx_dataset
from ..errors import DatasetError
from ._data import DetectionDataset, write_coco

__all__ = ["SynthConfig", "synth_scenes", "write_synth_coco"]

# An item pixel belongs to the object when its Fashion-MNIST intensity is above this.
_MASK_LEVEL = 24


@dataclass(frozen=True)
class SynthConfig:
    scenes: int = 200
    size_px: int = 160
    min_objects: int = 1
    max_objects: int = 5
    min_object_frac: float = 0.12  # object side as a fraction of the scene side, log-uniform
    max_object_frac: float = 0.5
    max_occlusion: float = 0.4  # at most this fraction of an object hidden by later ones
    seed: int = 0
    split: str = "train"  # which Fashion-MNIST split the items come from

    def check(self) -> None:
        if self.scenes < 1:
            raise DatasetError("scenes must be >= 1")
        if not 32 <= self.size_px <= 1024:
            raise DatasetError(f"size must be 32..1024 px, not {self.size_px}")
        if not 1 <= self.min_objects <= self.max_objects <= 20:
            raise DatasetError("objects per scene must satisfy 1 <= min <= max <= 20")
        if not 0 < self.min_object_frac <= self.max_object_frac <= 1:
            raise DatasetError("object fractions must satisfy 0 < min <= max <= 1")
        if self.min_object_frac * self.size_px < 8:
            raise DatasetError(f"smallest objects would be under 8 px at {self.size_px} px; "
                               "raise min_object_frac or the size")
        if not 0 <= self.max_occlusion < 1:
            raise DatasetError("max_occlusion must be in [0, 1)")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random texture, float [size, size, 3] on [0, 1]: gradient, stripes, checks or noise,
    over two random colours, plus grain."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(4)
    if kind == 0:  # linear gradient in a random direction
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy)
    elif kind == 1:  # stripes
        a, f = rng.uniform(0, np.pi), rng.uniform(3, 12)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy))
    elif kind == 2:  # checks
        f = rng.integers(3, 10)
        t = ((np.floor(xx * f) + np.floor(yy * f)) % 2).astype(np.float32)
    else:  # smooth blobs: coarse noise upsampled
        coarse = rng.uniform(size=(6, 6)).astype(np.float32)
        idx = np.minimum((np.arange(size) * 6) // size, 5)
        t = coarse[idx][:, idx]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img += rng.normal(0, 0.04, img.shape)
    return img.clip(0, 1).astype(np.float32)


def _tint(rng: np.random.Generator) -> np.ndarray:
    """A saturated-enough colour so items stand out from most backgrounds."""
    c = rng.uniform(0.15, 1.0, 3)
    c[rng.integers(3)] = rng.uniform(0.6, 1.0)
    return c.astype(np.float32)


def _scaled_item(item: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(item).resize((side, side), Image.Resampling.BILINEAR),
                      np.uint8)


def synth_scenes(cfg: SynthConfig, *, items: np.ndarray | None = None,
                 item_labels: np.ndarray | None = None,
                 class_names: tuple[str, ...] = FASHION_MNIST_LABELS) -> DetectionDataset:
    """Render `cfg.scenes` scenes in memory (items default: the Fashion-MNIST split)."""
    cfg.check()
    if items is None or item_labels is None:
        items, item_labels = load_idx_dataset(FASHION_MNIST_ROOT, cfg.split)  # type: ignore
    rng = np.random.default_rng(cfg.seed)
    size = cfg.size_px
    images, boxes, labels, files = [], [], [], []
    for s in range(cfg.scenes):
        canvas = _background(rng, size)
        owner = np.full((size, size), -1, np.int64)  # which object each pixel shows
        areas: list[int] = []
        classes: list[int] = []
        wanted = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        for _attempt in range(wanted * 10):
            if len(classes) == wanted:
                break
            k = int(rng.integers(len(items)))
            frac = np.exp(rng.uniform(np.log(cfg.min_object_frac), np.log(cfg.max_object_frac)))
            side = max(8, int(round(frac * size)))
            item = _scaled_item(items[k], side)
            if rng.random() < 0.5:
                item = item[:, ::-1]
            mask = item > _MASK_LEVEL
            if mask.sum() < 16:
                continue
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
            region = owner[y0:y0 + side, x0:x0 + side]
            # Would this object hide too much of one placed before it?
            covered = np.bincount(region[mask & (region >= 0)], minlength=len(areas))
            visible = np.bincount(owner[owner >= 0], minlength=len(areas)) - covered
            if any(visible[j] < (1 - cfg.max_occlusion) * areas[j] for j in range(len(areas))):
                continue
            alpha = np.clip(item.astype(np.float32) / 255 * 3, 0, 1)[..., None]
            shade = 0.35 + 0.65 * item.astype(np.float32)[..., None] / 255
            patch = canvas[y0:y0 + side, x0:x0 + side]
            patch[:] = patch * (1 - alpha) + _tint(rng) * shade * alpha
            region[mask] = len(areas)
            areas.append(int(mask.sum()))
            classes.append(int(item_labels[k]))
        scene_boxes = []
        for j in range(len(areas)):
            ys, xs = np.nonzero(owner == j)
            scene_boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        images.append(np.rint(canvas * 255).astype(np.uint8))
        boxes.append(np.asarray(scene_boxes, np.float32).reshape(-1, 4))
        labels.append(np.asarray(classes, np.int64))
        files.append(f"{s:06d}.png")
    return DetectionDataset(tuple(images), tuple(boxes), tuple(labels), tuple(class_names),
                            tuple(files), f"synthetic scenes (seed {cfg.seed})")


def write_synth_coco(cfg: SynthConfig, out_dir: Path | str) -> tuple[Path, DetectionDataset]:
    """Render the scenes and write them as a COCO data set; returns (annotations.json, data)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetError(f"{out_dir} exists and is not empty; choose a new folder")
    dataset = synth_scenes(cfg)
    info: dict[str, Any] = {
        "description": "SYNTHETIC detection scenes: Fashion-MNIST items scaled and tinted on "
                       "generated textures; not real photographs",
        "synthetic": True, "generator": "edgewise.ml.detect.synth_scenes",
        "items": f"fashion-mnist {cfg.split} split", "config": asdict(cfg)}
    return write_coco(dataset, out_dir, info=info), dataset
