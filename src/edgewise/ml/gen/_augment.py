"""Rare-class synthesis: sample a class from a cVAE bundle's decoder (or a DDPM bundle's sampler)
into an image folder.

Invariant: output is an ordinary image folder (one sub-folder per class, 8-bit grayscale PNGs)
that `edgewise train --data DIR` reads; samples are reproducible from the seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...artifacts import validate_bundle
from ..errors import MLError

__all__ = ["class_folder_name", "sample_images", "synthesize"]


def class_folder_name(label: str) -> str:
    """A label as a folder name ('T-shirt/top' -> 'T-shirt_top')."""
    return label.replace("/", "_").replace("\\", "_").strip() or "class"


def sample_images(bundle_dir: Path | str, *, label: str, n: int, seed: int = 0,
                  batch: int = 256) -> np.ndarray:
    """`n` generated images of `label` from a class-conditional generator bundle (cVAE or
    DDPM), uint8 [n, C, H, W]."""
    import onnxruntime as ort

    bundle_dir = Path(bundle_dir)
    manifest = validate_bundle(bundle_dir)
    spec = manifest.generator
    if spec is None or not spec.conditional:
        raise MLError(f"{manifest.release_name} has no class-conditional generator "
                      "(train one with `edgewise gen train --kind cvae` or `--kind ddpm`)")
    if label not in manifest.labels:
        raise MLError(f"unknown class {label!r} (one of {', '.join(manifest.labels)})")
    sess = ort.InferenceSession(str(bundle_dir / spec.model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    onehot = np.zeros((1, len(manifest.labels)), np.float32)
    onehot[0, manifest.labels.index(label)] = 1.0
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        z = rng.standard_normal((m, spec.latent_dim)).astype(np.float32)
        images = sess.run(None, {"z": z, "label": np.repeat(onehot, m, axis=0)})[0]
        out.append((np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 1), np.uint8)


def synthesize(bundle_dir: Path | str, *, label: str, n: int, out_dir: Path | str,
               seed: int = 0, batch: int = 256) -> list[Path]:
    """Write `n` generated images of `label` to OUT/<label>/gen-<seed>-<i>.png."""
    from PIL import Image

    images = sample_images(bundle_dir, label=label, n=n, seed=seed, batch=batch)
    dest = Path(out_dir) / class_folder_name(label)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for i, img in enumerate(images[:, 0]):
        path = dest / f"gen-{seed}-{i:05d}.png"
        Image.fromarray(img, mode="L").save(path)
        written.append(path)
    return written
