"""IDX reading and stratified subsets, on crafted files and on the real Fashion-MNIST."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from edgewise.ml import DatasetError, MLError
from edgewise.ml.data import (
    FASHION_MNIST_LABELS,
    FASHION_MNIST_ROOT,
    load_idx_dataset,
    read_idx,
    stratified_subset,
)


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    array = np.asarray(array, np.uint8)
    magic = magic if magic is not None else 0x0800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def write_split(root: Path, images: np.ndarray, labels: np.ndarray, *, split: str = "train",
                gz: bool = True, image_bytes: bytes | None = None,
                label_bytes: bytes | None = None) -> None:
    prefix = {"train": "train", "test": "t10k"}[split]
    root.mkdir(parents=True, exist_ok=True)
    for stem, data in ((f"{prefix}-images-idx3-ubyte", image_bytes or idx_bytes(images)),
                       (f"{prefix}-labels-idx1-ubyte", label_bytes or idx_bytes(labels))):
        if gz:
            (root / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (root / stem).write_bytes(data)


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)


@pytest.fixture
def labels() -> np.ndarray:
    return np.arange(20, dtype=np.uint8) % 10


@pytest.mark.parametrize("gz", [True, False])
def test_round_trip(tmp_path: Path, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    write_split(tmp_path, images, labels, gz=gz, split="test")
    x, y = load_idx_dataset(tmp_path, "test")
    assert x.dtype == np.uint8 and x.shape == (20, 28, 28)
    assert y.dtype == np.int64 and y.tolist() == labels.tolist()
    np.testing.assert_array_equal(x, images)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_idx_dataset(tmp_path / "nowhere")


def test_missing_file(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    write_split(tmp_path, images, labels)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="missing train-labels-idx1-ubyte"):
        load_idx_dataset(tmp_path)


def test_bad_magic(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    # A label file where the image file should be: valid IDX, wrong kind.
    write_split(tmp_path, images, labels, image_bytes=idx_bytes(labels))
    with pytest.raises(DatasetError, match="bad magic number 0x00000801"):
        load_idx_dataset(tmp_path)


def test_not_idx_at_all(tmp_path: Path) -> None:
    path = tmp_path / "x.idx"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(DatasetError, match="bad magic number"):
        read_idx(path)


@pytest.mark.parametrize("cut", [2, 10, 100])
def test_truncated_file(tmp_path: Path, images: np.ndarray, labels: np.ndarray, cut: int) -> None:
    data = idx_bytes(images)
    write_split(tmp_path, images, labels, image_bytes=data[:-cut] if cut != 2 else data[:2])
    with pytest.raises(DatasetError, match="truncated"):
        load_idx_dataset(tmp_path)


def test_trailing_bytes(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    write_split(tmp_path, images, labels, label_bytes=idx_bytes(labels) + b"\x00")
    with pytest.raises(DatasetError, match="trailing bytes"):
        load_idx_dataset(tmp_path)


def test_truncated_gzip_stream(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    write_split(tmp_path, images, labels)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="unreadable or truncated"):
        load_idx_dataset(tmp_path)


def test_count_mismatch(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    write_split(tmp_path, images, labels[:19])
    with pytest.raises(DatasetError, match="20 images but 19 labels"):
        load_idx_dataset(tmp_path)


def test_label_out_of_range(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    bad = labels.copy()
    bad[3] = 10
    write_split(tmp_path, images, bad)
    with pytest.raises(DatasetError, match="out of range"):
        load_idx_dataset(tmp_path)


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown split"):
        load_idx_dataset(tmp_path, "validation")  # type: ignore[arg-type]


def test_dataset_error_is_ml_error() -> None:
    assert issubclass(DatasetError, MLError)


def test_stratified_subset_is_balanced_and_deterministic() -> None:
    labels = np.random.default_rng(1).integers(0, 5, size=1000)
    idx = stratified_subset(labels, 30, seed=7)
    assert len(idx) == 150 and len(set(idx.tolist())) == 150
    assert np.bincount(labels[idx]).tolist() == [30] * 5
    np.testing.assert_array_equal(idx, stratified_subset(labels, 30, seed=7))
    assert not np.array_equal(idx, stratified_subset(labels, 30, seed=8))


def test_stratified_subset_refuses_to_unbalance() -> None:
    with pytest.raises(DatasetError, match="class 1 has 2 examples"):
        stratified_subset(np.array([0, 0, 0, 1, 1]), 3)


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir() and not os.environ.get("CI"),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist() -> None:
    x, y = load_idx_dataset(FASHION_MNIST_ROOT, "test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [1000] * len(FASHION_MNIST_LABELS)
