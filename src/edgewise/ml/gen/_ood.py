"""Out-of-distribution images built locally, to measure an anomaly score without downloads.

Invariant: every set is uint8 [N, 28, 28] like Fashion-MNIST and reproducible from its seed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["OOD_KINDS", "auroc", "make_ood", "threshold_for_fpr"]

OOD_KINDS = ("digits", "noise", "rotated", "inverted")


def _digits(n: int, rng: np.random.Generator) -> np.ndarray:
    """MNIST-like: a white digit on black, random size, shift, slant and stroke blur."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    out = np.zeros((n, 28, 28), np.uint8)
    fonts = {s: ImageFont.load_default(size=s) for s in (18, 20, 22, 24)}
    for i in range(n):
        img = Image.new("L", (28, 28))
        draw = ImageDraw.Draw(img)
        size = int(rng.choice(list(fonts)))
        draw.text((14 + rng.integers(-3, 4), 14 + rng.integers(-2, 3)), str(rng.integers(10)),
                  fill=255, font=fonts[size], anchor="mm",
                  stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
        img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.8))))
        out[i] = np.asarray(img)
    return out


def make_ood(kind: str, n: int, *, source: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """`n` images of one OOD kind; 'rotated' and 'inverted' transform `source` images."""
    rng = np.random.default_rng(seed)
    if kind == "digits":
        return _digits(n, rng)
    if kind == "noise":
        return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    if source is None:
        raise ValueError(f"OOD kind {kind!r} needs source images")
    pick = source[rng.permutation(len(source))[:n]]
    if kind == "rotated":
        return np.ascontiguousarray(np.rot90(pick, k=1, axes=(1, 2)))
    if kind == "inverted":
        return 255 - pick
    raise ValueError(f"unknown OOD kind {kind!r} (use one of {', '.join(OOD_KINDS)})")


def auroc(inlier: np.ndarray, outlier: np.ndarray) -> float:
    """Probability that an outlier scores higher than an inlier (ties count half)."""
    scores = np.concatenate([inlier, outlier]).astype(np.float64)
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks over ties
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    n_in, n_out = len(inlier), len(outlier)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def threshold_for_fpr(inlier_scores: np.ndarray, target_fpr: float) -> float:
    """The score above which a share `target_fpr` of in-distribution images lies."""
    return float(np.quantile(np.asarray(inlier_scores, np.float64), 1.0 - target_fpr))
