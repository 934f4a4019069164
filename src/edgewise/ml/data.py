"""Labelled image sets from local files: IDX (MNIST, Fashion-MNIST) and image folders.

Invariant: `load_idx_dataset` returns only complete, consistent data: images uint8 [N, H, W]
and labels int64 [N] with the same N, every label in range; anything else on disk (missing,
truncated, wrong magic, trailing garbage, mismatched counts) raises `DatasetError`. Nothing is
ever downloaded. The same holds for `load_image_folder`: a corrupt image or an empty class folder
is an error naming the file, never a silently smaller data set.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import DatasetError

__all__ = [
    "FASHION_MNIST_LABELS",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_STD",
    "ImageDataset",
    "class_balance_warnings",
    "write_idx_dataset",
    "load_dataset",
    "load_idx_dataset",
    "load_image_folder",
    "read_idx",
    "stratified_split",
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


def write_idx_dataset(root: Path | str, split: Literal["train", "test"], images: np.ndarray,
                      labels: np.ndarray) -> None:
    """Write uint8 images [N, H, W] and labels [N] as an MNIST-layout split that
    `load_idx_dataset` (and `--data DIR`) reads: a data set cut down or rebalanced locally."""
    if split not in _SPLIT_PREFIX:
        raise DatasetError(f"unknown split {split!r} (use 'train' or 'test')")
    if images.ndim != 3 or len(images) != len(labels):
        raise DatasetError(f"images must be [N, H, W] with one label each, got {images.shape} "
                           f"and {len(labels)} labels")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    prefix = _SPLIT_PREFIX[split]
    (root / f"{prefix}-images-idx3-ubyte").write_bytes(
        (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
        + images.astype(np.uint8).tobytes())
    (root / f"{prefix}-labels-idx1-ubyte").write_bytes(
        (0x801).to_bytes(4, "big") + len(labels).to_bytes(4, "big")
        + labels.astype(np.uint8).tobytes())


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


# ---- any labelled image set: IDX directories and image folders ----------------------------

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# A class this many times rarer than the most common one skews a plain cross-entropy model.
IMBALANCE_RATIO = 3.0


@dataclass(frozen=True)
class ImageDataset:
    """Images uint8 [N, H, W] (grayscale) or [N, H, W, 3] (RGB) with int64 labels [N]."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{self.source}: {len(self.images)} images but "
                               f"{len(self.labels)} labels")

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[3])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, idx: np.ndarray) -> ImageDataset:
        return ImageDataset(self.images[idx], self.labels[idx], self.class_names, self.source)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}


def class_balance_warnings(dataset: ImageDataset) -> list[str]:
    """Human-readable warnings about missing or strongly under-represented classes."""
    counts = dataset.class_counts()
    warn = [f"class {name!r} has no training images" for name, c in counts.items() if c == 0]
    top = max(counts.values(), default=0)
    rare = {n: c for n, c in counts.items() if c > 0 and top / c >= IMBALANCE_RATIO}
    if rare:
        listed = ", ".join(f"{n!r} ({c})" for n, c in sorted(rare.items(), key=lambda kv: kv[1]))
        warn.append(f"imbalanced classes: {listed} vs {top} for the largest; expect lower "
                    "recall on them (collect more, or weigh the loss)")
    return warn


def stratified_split(labels: np.ndarray, val_fraction: float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) indices; every class keeps its share in both, >= 1 each."""
    labels = np.asarray(labels)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if len(members) < 2:
            raise DatasetError(f"class {cls} has {len(members)} image(s); a train/validation "
                               "split needs at least 2 per class")
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DatasetError(f"{root}: no class folders (expected one sub-folder of images "
                           "per class)")
    return dirs


def load_image_folder(root: Path | str, *, size: tuple[int, int] | None = None) -> ImageDataset:
    """Load a folder of class folders of PNG/JPEG images (ImageFolder layout).

    Images that are all grayscale stay 1-channel, otherwise everything becomes RGB. All images
    are resized (bilinear) to `size` (height, width); by default to the size they share, or to
    the most common size when they differ.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    names, files = [], []
    for class_dir in _class_dirs(root):
        found = sorted(p for p in class_dir.rglob("*")
                       if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        if not found:
            raise DatasetError(f"{class_dir}: empty class (no .png/.jpg/.jpeg images)")
        names.append(class_dir.name)
        files.append(found)
    pictures, labels = [], []
    for cls, paths in enumerate(files):
        for path in paths:
            try:
                with Image.open(path) as img:
                    img.load()
                    pictures.append(img.convert("L") if img.mode in ("L", "1", "I;16", "I")
                                    else img.convert("RGB"))
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
                raise DatasetError(f"{path}: corrupt or unreadable image: {exc}") from exc
            labels.append(cls)
    gray = all(p.mode == "L" for p in pictures)
    if size is None:
        sizes = [(p.height, p.width) for p in pictures]
        size = max(set(sizes), key=sizes.count)
    h, w = size
    arrays = []
    for p in pictures:
        p = p if gray else p.convert("RGB")
        if (p.height, p.width) != (h, w):
            p = p.resize((w, h), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(p, np.uint8))
    return ImageDataset(np.stack(arrays), np.asarray(labels, np.int64), tuple(names), str(root))


def _idx_class_names(root: Path, labels: np.ndarray) -> tuple[str, ...]:
    n = int(labels.max()) + 1 if labels.size else 0
    if "fashion" in str(root).lower() and n <= len(FASHION_MNIST_LABELS):
        return FASHION_MNIST_LABELS
    return tuple(str(i) for i in range(n))


def load_dataset(spec: str | Path) -> tuple[ImageDataset, ImageDataset | None]:
    """(train, test or None) for `fashion-mnist`, an IDX directory or an image folder.

    An image folder with `train/` and `test/` sub-folders gives both splits; otherwise the
    caller holds out its own test split.
    """
    root = FASHION_MNIST_ROOT if str(spec) == "fashion-mnist" else Path(spec)
    if not root.exists():
        raise DatasetError(f"dataset {spec!s}: no such directory (give 'fashion-mnist', an IDX "
                           "directory or a folder of class folders)")
    if not root.is_dir():
        raise DatasetError(f"dataset {spec!s} is not a directory")
    if any(root.glob("*-idx[13]-ubyte*")):
        train = load_idx_dataset(root, "train")
        test = load_idx_dataset(root, "test")
        names = _idx_class_names(root, np.concatenate([train[1], test[1]]))
        return (ImageDataset(*train, names, f"{root} (train)"),
                ImageDataset(*test, names, f"{root} (test)"))
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_ds = load_image_folder(root / "train")
        test_ds = load_image_folder(root / "test", size=train_ds.size)
        if test_ds.class_names != train_ds.class_names:
            raise DatasetError(f"{root}: train/ and test/ have different class folders")
        if test_ds.channels != train_ds.channels:
            test_ds = ImageDataset(_to_channels(test_ds.images, train_ds.channels),
                                   test_ds.labels, test_ds.class_names, test_ds.source)
        return train_ds, test_ds
    return load_image_folder(root), None


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3 and images.ndim == 3:
        return np.repeat(images[..., None], 3, axis=3)
    if channels == 1 and images.ndim == 4:
        gray = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return images
