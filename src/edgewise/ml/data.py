"""IDX datasets (MNIST, Fashion-MNIST) read from local files, and stratified subsets.

Invariant: `load_idx_dataset` returns only complete, consistent data: images uint8 [N, H, W]
and labels int64 [N] with the same N, every label in range; anything else on disk (missing,
truncated, wrong magic, trailing garbage, mismatched counts) raises `DatasetError`. Nothing is
ever downloaded.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import DatasetError

__all__ = [
    "FASHION_MNIST_LABELS",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_STD",
    "load_idx_dataset",
    "read_idx",
    "stratified_subset",
]

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Pixel statistics of the 60k training images on [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_UBYTE = 0x08
_IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        if gzipped:
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as exc:  # gzip reports truncation as EOFError
        raise DatasetError(f"{path}: unreadable or truncated: {exc}") from exc


def read_idx(path: Path | str, *, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (plain or gzip) of unsigned bytes into an array of its shape."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DatasetError(f"{path}: bad magic number 0x{magic:08x} "
                           f"(expected 0x{expected_magic:08x})")
    if data[0] != 0 or data[1] != 0 or data[2] != _UBYTE or not 1 <= data[3] <= 4:
        raise DatasetError(f"{path}: bad magic number 0x{magic:08x} (not an unsigned-byte IDX)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    body = len(data) - header
    if body != expected:
        kind = "truncated" if body < expected else "has trailing bytes"
        raise DatasetError(f"{path}: file {kind}: header says {shape} = {expected} bytes, "
                           f"found {body}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_idx_dataset(
    root: Path | str = FASHION_MNIST_ROOT,
    split: Literal["train", "test"] = "train",
    *,
    num_classes: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Load (images uint8 [N, H, W], labels int64 [N]) of an MNIST-layout dataset split."""
    if split not in _SPLIT_PREFIX:
        raise DatasetError(f"unknown split {split!r} (use 'train' or 'test')")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist (Fashion-MNIST: "
                           "apt-get install dataset-fashion-mnist)")
    prefix = _SPLIT_PREFIX[split]
    paths = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        candidates = [root / f"{stem}.gz", root / stem]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DatasetError(f"{root}: missing {stem}.gz (or {stem})")
        paths.append(found)
    images = read_idx(paths[0], expected_magic=_IMAGE_MAGIC)
    labels = read_idx(paths[1], expected_magic=_LABEL_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise DatasetError(f"{root} ({split}): {len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{paths[1]}: labels out of range [0, {num_classes}) "
                           f"(found {labels.min()}..{labels.max()})")
    return images, labels


def stratified_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `per_class` random examples of every class present in `labels`.

    Raises if a class has fewer examples than asked for, rather than silently unbalancing.
    """
    labels = np.asarray(labels)
    if per_class <= 0:
        raise ValueError("per_class must be positive")
    rng = np.random.default_rng(seed)
    picks = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise DatasetError(f"class {cls} has {len(members)} examples, {per_class} requested")
        picks.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(picks))
