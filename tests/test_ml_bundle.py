"""The quick recipe end to end: a real (small) bundle, its golden set, and a broken release."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgewise.artifacts import load_golden, validate_bundle
from edgewise.ml import ExportError
from edgewise.ml.backbones import create_backbone
from edgewise.ml.data import FASHION_MNIST_LABELS, FASHION_MNIST_ROOT, load_idx_dataset
from edgewise.ml.quick import (
    FASHION_MNIST_PREPROCESSING,
    build_feature_head_bundle,
    evaluate_onnx,
    export_onnx,
    preprocess_images,
)

# `make test` installs the data set; CI must never skip these silently.
pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_ROOT.is_dir() and not os.environ.get("CI"),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)

SMALL = {"train_per_class": 40, "test_per_class": 20}


def run_golden(bundle: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """What the device health check does: run the golden inputs, compare with the outputs."""
    manifest = validate_bundle(bundle)
    golden = load_golden(bundle, manifest)
    session = ort.InferenceSession(str(bundle / manifest.model),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {manifest.preprocessing.input_name: golden.inputs})[0]
    return got, golden.outputs, manifest.golden.atol


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, int, int]]]:
    out = tmp_path_factory.mktemp("good")
    calls: list[tuple[str, int, int]] = []
    build_feature_head_bundle(out, name="fmnist-quick", version="1.0.0", seed=1,
                              progress=lambda *a: calls.append(a), **SMALL)
    return out, calls


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("broken")
    build_feature_head_bundle(out, name="fmnist-quick", version="1.0.1", seed=1, broken=True,
                              **SMALL)
    return out


def test_bundle_is_valid_and_self_describing(good) -> None:
    bundle, _ = good
    manifest = validate_bundle(bundle)
    assert manifest.labels == FASHION_MNIST_LABELS
    assert manifest.preprocessing == FASHION_MNIST_PREPROCESSING
    assert set(manifest.files) == {"model.onnx", "golden.npz", "MODEL_CARD.md"}
    assert manifest.golden.count == 8 and manifest.golden.max_latency_ms >= 250
    assert manifest.metrics["train_images"] + manifest.metrics["val_images"] == 400
    assert manifest.metrics["test_images"] == 200
    assert manifest.metrics["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert manifest.metrics["shipped_test_accuracy"] == manifest.metrics["test_accuracy"]
    assert manifest.provenance["deliberately_broken"] is False
    assert len(manifest.provenance["backbone_weights_sha256"]) == 64
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "Fashion-MNIST" in card and "test accuracy" in card


def test_onnxruntime_reproduces_golden_set(good) -> None:
    got, expected, atol = run_golden(good[0])
    assert np.abs(got - expected).max() <= atol
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_model_has_dynamic_batch_and_named_io(good) -> None:
    session = ort.InferenceSession(str(good[0] / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    x = np.zeros((3, 1, 28, 28), np.float32)
    assert session.run(None, {"input": x})[0].shape == (3, 10)
    assert session.run(None, {"input": x[:1]})[0].shape == (1, 10)


def test_progress_reports_every_stage(good) -> None:
    stages = [c[0] for c in good[1]]
    for stage in ("load data", "embed train", "embed test", "train head", "export",
                  "write bundle"):
        assert stage in stages
    assert all(0 <= done <= total for _, done, total in good[1])


def test_evaluate_onnx_agrees_with_build(good) -> None:
    images, labels = load_idx_dataset(FASHION_MNIST_ROOT, "test")
    acc = evaluate_onnx(good[0] / "model.onnx", images[:500], labels[:500],
                        FASHION_MNIST_PREPROCESSING)
    assert acc > 0.5


def test_broken_bundle_fails_golden_set(broken: Path) -> None:
    manifest = validate_bundle(broken)  # the bundle itself is well-formed and signed-off-able
    assert manifest.provenance["deliberately_broken"] is True
    assert "deliberately broken for the rollback demo" in manifest.provenance["note"]
    assert manifest.metrics["shipped_test_accuracy"] < 0.3
    got, expected, atol = run_golden(broken)
    assert np.abs(got - expected).max() > atol


def test_export_parity_failure_raises(tmp_path: Path) -> None:
    from edgewise.ml.quick import _check_parity

    model = create_backbone("small-cnn", pretrained=False)
    path = tmp_path / "m.onnx"
    x = torch.randn(2, 1, 28, 28)
    export_onnx(model, x, path)
    other = create_backbone("small-cnn", pretrained=False)  # different random weights
    with pytest.raises(ExportError, match="disagree"):
        _check_parity(other, path, x.numpy())


def test_preprocess_images_follows_the_contract() -> None:
    img = np.full((2, 28, 28), 255, np.uint8)
    x = preprocess_images(img, FASHION_MNIST_PREPROCESSING)
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x, (1.0 - 0.2860) / 0.3530, rtol=1e-6)
    rgb_big = np.zeros((1, 56, 56, 3), np.uint8)
    assert preprocess_images(rgb_big, FASHION_MNIST_PREPROCESSING).shape == (1, 1, 28, 28)


