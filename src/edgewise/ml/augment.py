"""Batch image augmentation in plain torch: flip, crop, rotate, translate, scale, colour, erase.

Invariant: `augment_batch` maps a float batch [B, C, H, W] of pixels in [0, 1] to a batch of the
same shape, dtype and range; with `AugmentConfig.none()` it returns its input unchanged. Every
random draw comes from the generator passed in, so a seed reproduces a run. Works on whole
batches (one affine grid, one gather) because per-image Python loops would cost more than the
small models they feed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["AUGMENT_PRESETS", "AugmentConfig", "augment_batch"]


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = False
    crop_pad_px: int = 0  # random crop of the image padded by this many pixels
    rotate_deg: float = 0.0  # uniform in [-rotate_deg, rotate_deg]
    translate_frac: float = 0.0  # of the image size, per axis
    scale: tuple[float, float] = (1.0, 1.0)  # zoom range
    brightness: float = 0.0  # additive, uniform in [-b, b]
    contrast: float = 0.0  # multiplicative around the image mean, in [1-c, 1+c]
    saturation: float = 0.0  # RGB only: blend towards grey, in [1-s, 1+s]
    erase_p: float = 0.0  # probability of blanking one random rectangle (2-20% of the area)

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls()

    @classmethod
    def preset(cls, name: str) -> AugmentConfig:
        try:
            return AUGMENT_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown augmentation preset {name!r} "
                             f"(known: {', '.join(AUGMENT_PRESETS)})") from None

    @property
    def is_identity(self) -> bool:
        return self == AugmentConfig()

    def to_dict(self) -> dict:
        return asdict(self)


AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    "flip": AugmentConfig(hflip=True),
    # Flips and small shifts: what a centred product photo can plausibly vary by.
    "light": AugmentConfig(hflip=True, crop_pad_px=2),
    "default": AugmentConfig(hflip=True, crop_pad_px=2, erase_p=0.3),
    "strong": AugmentConfig(hflip=True, crop_pad_px=3, rotate_deg=10.0, scale=(0.9, 1.1),
                            brightness=0.1, contrast=0.2, saturation=0.2, erase_p=0.5),
}


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def augment_batch(x: torch.Tensor, cfg: AugmentConfig,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    if cfg.is_identity:
        return x
    b, c, h, w = x.shape
    if cfg.hflip:
        flip = (torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x)
    if cfg.crop_pad_px:
        p = cfg.crop_pad_px
        padded = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
        cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [B, 1, W]
        x = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols]
        x = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    if cfg.rotate_deg or cfg.translate_frac or cfg.scale != (1.0, 1.0):
        angle = _uniform(b, -cfg.rotate_deg, cfg.rotate_deg, generator) * (math.pi / 180)
        zoom = _uniform(b, *cfg.scale, generator)
        tx = _uniform(b, -cfg.translate_frac, cfg.translate_frac, generator) * 2
        ty = _uniform(b, -cfg.translate_frac, cfg.translate_frac, generator) * 2
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), [b, c, h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.brightness or cfg.contrast or (cfg.saturation and c == 3):
        if cfg.saturation and c == 3:
            grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            s = _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, generator).view(b, 1, 1, 1)
            x = grey + (x - grey) * s
        if cfg.contrast:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            k = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, generator).view(b, 1, 1, 1)
            x = mean + (x - mean) * k
        if cfg.brightness:
            x = x + _uniform(b, -cfg.brightness, cfg.brightness, generator).view(b, 1, 1, 1)
        x = x.clamp(0.0, 1.0)
    if cfg.erase_p:
        area = _uniform(b, 0.02, 0.2, generator) * h * w
        aspect = torch.exp(_uniform(b, math.log(0.3), math.log(3.3), generator))
        eh = (area * aspect).sqrt().clamp(1, h).long()
        ew = (area / aspect).sqrt().clamp(1, w).long()
        y0 = (torch.rand(b, generator=generator) * (h - eh + 1)).long()
        x0 = (torch.rand(b, generator=generator) * (w - ew + 1)).long()
        on = torch.rand(b, generator=generator) < cfg.erase_p
        ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        box = ((ys >= y0.view(b, 1, 1)) & (ys < (y0 + eh).view(b, 1, 1))
               & (xs >= x0.view(b, 1, 1)) & (xs < (x0 + ew).view(b, 1, 1)) & on.view(b, 1, 1))
        x = x.masked_fill(box[:, None], 0.0)
    return x
