"""Box-aware augmentation for detector training: flip, zoom (crop or pad), translate, colour.

Geometry is one axis-aligned affine map per image, x' = s * x + tx and y' = s * y + ty in
pixel-edge coordinates (a pixel i spans [i, i + 1)); the image is resampled through exactly
that map (`affine_grid` + `grid_sample`, `align_corners=False`) and every box corner goes
through the same map, so boxes follow their pixels. Without rotation or shear an axis-aligned
box stays axis-aligned and tight. Zooming in (s > 1) crops a random window of the image,
zooming out pads it with grey (the backbone's mean, 0 after normalisation); a translation on
top shifts it further. Colour jitter (brightness, contrast, saturation, hue) touches pixels
only: hue and saturation are one 3x3 colour matrix per image (a rotation and a scale of the
YIQ chroma plane, luma kept).

Invariant: `augment_detection_batch` returns images of the input's shape in [0, 1] and, per
image, boxes inside the image ([0, W] x [0, H]) with positive width and height; a box whose
visible part is below `min_visible` of its moved area (cut by the crop or pushed out of the
frame) is dropped with its label. Every random draw comes from the torch generator passed in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DETECT_AUGMENT_PRESETS", "DetectAugment", "augment_detection_batch", "move_boxes"]

_PAD_GREY = 127 / 255  # EfficientNet-Lite0's mean: padding normalises to 0
_MIN_SIDE_PX = 1.0  # a clipped box thinner than this holds no object worth a target


@dataclass(frozen=True)
class DetectAugment:
    hflip: bool = False
    zoom_p: float = 0.0  # probability of zooming an image (in or out)
    zoom: tuple[float, float] = (1.0, 1.0)  # scale range, drawn log-uniformly
    translate_frac: float = 0.0  # extra shift, uniform in +-frac of the side, per axis
    brightness: float = 0.0  # additive, uniform in [-b, b]
    contrast: float = 0.0  # around the image's mean, factor in [1 - c, 1 + c]
    saturation: float = 0.0  # factor in [1 - s, 1 + s]
    hue: float = 0.0  # rotation, uniform in [-h, h] of the full circle (0.5 = 180 degrees)
    min_visible: float = 0.35  # keep a cut box only if this share of its area is in view

    @property
    def geometric(self) -> bool:
        return (self.zoom_p > 0 and self.zoom != (1.0, 1.0)) or self.translate_frac > 0

    @property
    def colour(self) -> bool:
        return bool(self.brightness or self.contrast or self.saturation or self.hue)

    def to_dict(self) -> dict:
        return asdict(self)


DETECT_AUGMENT_PRESETS: dict[str, DetectAugment] = {
    "none": DetectAugment(),
    "flip": DetectAugment(hflip=True),
    # Zoom 0.6x-1.6x on most images: the synthetic scenes' objects span 12-50% of the side,
    # a camera's far more; mild colour jitter for light and white balance.
    "default": DetectAugment(hflip=True, zoom_p=0.7, zoom=(0.6, 1.6), translate_frac=0.1,
                             brightness=0.15, contrast=0.25, saturation=0.3, hue=0.04),
}


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo


def _draw_affine(b: int, h: int, w: int, cfg: DetectAugment, gen: torch.Generator | None):
    """Per image scale s, shifts tx, ty (pixels) and flip, as float64 tensors [B]."""
    flip = (torch.rand(b, generator=gen) < 0.5) if cfg.hflip else torch.zeros(b, dtype=torch.bool)
    s = torch.ones(b, dtype=torch.float64)
    tx = torch.zeros(b, dtype=torch.float64)
    ty = torch.zeros(b, dtype=torch.float64)
    if cfg.zoom_p > 0 and cfg.zoom != (1.0, 1.0):
        lo, hi = math.log(cfg.zoom[0]), math.log(cfg.zoom[1])
        on = torch.rand(b, generator=gen) < cfg.zoom_p
        s = torch.where(on, torch.exp(_uniform(b, lo, hi, gen)), s)
        # The window: zoomed in, a random crop inside the image; zoomed out, the image at a
        # random place inside the frame. Both: t uniform between 0 and side * (1 - s).
        tx = _uniform(b, 0, 1, gen) * w * (1 - s)
        ty = _uniform(b, 0, 1, gen) * h * (1 - s)
    if cfg.translate_frac > 0:
        tx = tx + _uniform(b, -cfg.translate_frac, cfg.translate_frac, gen) * w
        ty = ty + _uniform(b, -cfg.translate_frac, cfg.translate_frac, gen) * h
    return flip, s, tx, ty


def _warp(x: torch.Tensor, s: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Resample so that output pixel-edge coordinate X' = s * X + t shows input X.

    With align_corners=False, normalised u = 2 X / W - 1; affine_grid wants, per output u',
    the input u: X = (X' - t) / s gives u = u' / s + (1 / s - 1 - 2 t / (s W))."""
    b, c, h, w = x.shape
    inv = 1 / s
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = inv
    theta[:, 1, 1] = inv
    theta[:, 0, 2] = inv - 1 - 2 * tx * inv / w
    theta[:, 1, 2] = inv - 1 - 2 * ty * inv / h
    grid = F.affine_grid(theta.to(x.dtype), [b, c, h, w], align_corners=False)
    # Pad with grey: sample (x - grey) with zero padding, add grey back.
    out = F.grid_sample(x - _PAD_GREY, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out + _PAD_GREY


def move_boxes(boxes: np.ndarray, labels: np.ndarray, *, flip: bool, s: float, tx: float,
               ty: float, size: tuple[int, int], min_visible: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """The boxes [n, 4] (x1, y1, x2, y2 px) after flip then x' = s x + t, clipped to the
    image; boxes with less than `min_visible` of their area left in view are dropped."""
    h, w = size
    bb = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    if flip:
        bb[:, [0, 2]] = w - bb[:, [2, 0]]
    bb[:, [0, 2]] = bb[:, [0, 2]] * s + tx
    bb[:, [1, 3]] = bb[:, [1, 3]] * s + ty
    area = (bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1])
    clipped = bb.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, w)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, h)
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    visible = np.where(area > 0, cw.clip(0) * ch.clip(0) / np.maximum(area, 1e-9), 0.0)
    keep = (visible >= min_visible) & (cw >= _MIN_SIDE_PX) & (ch >= _MIN_SIDE_PX)
    return clipped[keep].astype(np.float32), np.asarray(labels).reshape(-1)[keep]


# RGB -> YIQ (luma, two chroma axes): hue is a rotation of the chroma plane, saturation its
# scale, so both are one 3x3 matrix per image (kornia's HSV round trip took ~100 ms a batch
# of 16 at 160 px on a loaded core, a fifth of a training step).
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                    dtype=torch.float64)
_YIQ_INV = torch.linalg.inv(_YIQ)


def _colour(x: torch.Tensor, cfg: DetectAugment, gen: torch.Generator | None) -> torch.Tensor:
    b = x.shape[0]

    def factor(spread: float) -> torch.Tensor:
        return _uniform(b, -spread, spread, gen)

    if cfg.hue or cfg.saturation:
        angle = factor(cfg.hue) * (2 * math.pi)
        sat = 1 + factor(cfg.saturation)
        chroma = torch.zeros(b, 3, 3, dtype=torch.float64)
        chroma[:, 0, 0] = 1.0
        chroma[:, 1, 1] = chroma[:, 2, 2] = sat * torch.cos(angle)
        chroma[:, 1, 2] = -sat * torch.sin(angle)
        chroma[:, 2, 1] = sat * torch.sin(angle)
        m = (_YIQ_INV @ chroma @ _YIQ).to(x.dtype)
        x = torch.einsum("bij,bjhw->bihw", m, x)
    if cfg.contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + (x - mean) * (1 + factor(cfg.contrast)).to(x.dtype).view(b, 1, 1, 1)
    if cfg.brightness:
        x = x + factor(cfg.brightness).to(x.dtype).view(b, 1, 1, 1)
    return x.clamp(0.0, 1.0)


def augment_detection_batch(x: torch.Tensor, boxes: list[np.ndarray], labels: list[np.ndarray],
                            cfg: DetectAugment, generator: torch.Generator | None = None
                            ) -> tuple[torch.Tensor, list[np.ndarray], list[np.ndarray]]:
    """A float batch [B, 3, H, W] in [0, 1] with each image's boxes and labels, augmented
    together (see the module docstring)."""
    b, _, h, w = x.shape
    if len(boxes) != b or len(labels) != b:
        raise ValueError(f"{b} images but {len(boxes)} box sets and {len(labels)} label sets")
    flip, s, tx, ty = _draw_affine(b, h, w, cfg, generator)
    if flip.any():
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    moved = bool((s != 1).any() or (tx != 0).any() or (ty != 0).any())
    if moved:
        x = _warp(x, s, tx, ty)
    out_boxes, out_labels = [], []
    for i in range(b):
        bb, lab = move_boxes(boxes[i], labels[i], flip=bool(flip[i]), s=float(s[i]),
                             tx=float(tx[i]), ty=float(ty[i]), size=(h, w),
                             min_visible=cfg.min_visible)
        out_boxes.append(bb)
        out_labels.append(lab.astype(np.int64))
    if cfg.colour:
        x = _colour(x, cfg, generator)
    elif moved:
        x = x.clamp(0.0, 1.0)
    return x, out_boxes, out_labels
