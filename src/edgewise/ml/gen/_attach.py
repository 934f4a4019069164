"""A detector beside a classifier: the anomaly score of a generator bundle, shipped inside a
classifier bundle so every local prediction comes with its drift score.

Invariant: the result is a new, self-validated bundle; the classifier's graph, golden set and
files are copied unchanged, and the detector sees exactly the classifier's preprocessed input
(an affine adapter is prepended when the two preprocessing contracts differ in mean/std).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...artifacts import (
    MANIFEST_NAME,
    BundleManifest,
    DetectorSpec,
    load_golden,
    validate_bundle,
    write_bundle,
)
from ..errors import MLError

__all__ = ["DETECTOR_FILE", "attach_detector"]

DETECTOR_FILE = "detector.onnx"


def _adapted(model_path: Path, cls: BundleManifest, det: BundleManifest) -> bytes:
    """The detector graph fed the classifier's input: x_det = (x_cls * s_c + m_c - m_d) / s_d."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    c_pre, d_pre = cls.preprocessing, det.preprocessing
    if (c_pre.mean, c_pre.std) == (d_pre.mean, d_pre.std):
        return model.SerializeToString()
    shape = (1, len(c_pre.mean), 1, 1)
    scale = (np.asarray(c_pre.std, np.float32) / np.asarray(d_pre.std, np.float32))
    shift = ((np.asarray(c_pre.mean, np.float32) - np.asarray(d_pre.mean, np.float32))
             / np.asarray(d_pre.std, np.float32))
    graph = model.graph
    original = graph.input[0].name
    outer = "classifier_input"
    graph.initializer.extend([numpy_helper.from_array(scale.reshape(shape), "adapt_scale"),
                              numpy_helper.from_array(shift.reshape(shape), "adapt_shift")])
    nodes = [helper.make_node("Mul", [outer, "adapt_scale"], ["adapt_scaled"]),
             helper.make_node("Add", ["adapt_scaled", "adapt_shift"], [original])]
    graph.input[0].name = outer
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def attach_detector(classifier_dir: Path | str, generator_dir: Path | str,
                    out_dir: Path | str, *, version: str | None = None) -> BundleManifest:
    """Write OUT: the classifier bundle plus the generator bundle's anomaly detector."""
    classifier_dir, generator_dir = Path(classifier_dir), Path(generator_dir)
    cls, det = validate_bundle(classifier_dir), validate_bundle(generator_dir)
    if cls.kind != "image-classifier":
        raise MLError(f"{cls.release_name} is a {cls.kind} bundle, not a classifier")
    if det.detector is None:
        raise MLError(f"{det.release_name} has no anomaly detector to attach")
    if cls.detector is not None:
        raise MLError(f"{cls.release_name} already carries a detector")
    c_pre, d_pre = cls.preprocessing, det.preprocessing
    if (c_pre.input_size, c_pre.channels, c_pre.layout) != (d_pre.input_size, d_pre.channels,
                                                           d_pre.layout):
        raise MLError(f"the detector reads {d_pre.channels}x{d_pre.input_size} {d_pre.layout} "
                      f"images, the classifier {c_pre.channels}x{c_pre.input_size} "
                      f"{c_pre.layout}: they must see the same images")
    if DETECTOR_FILE in cls.files:
        raise MLError(f"{cls.release_name} already has a file named {DETECTOR_FILE}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MLError(f"{out_dir} is not empty")
    golden = load_golden(classifier_dir, cls)
    extra = {rel: classifier_dir / rel for rel in cls.files
             if rel not in (cls.model, cls.golden.file, MANIFEST_NAME)}
    extra[DETECTOR_FILE] = _adapted(generator_dir / det.detector.model, cls, det)
    spec = det.detector.model_copy(update={"model": DETECTOR_FILE})
    return write_bundle(
        out_dir, name=cls.name, version=version or cls.version, labels=cls.labels,
        preprocessing=cls.preprocessing, model=classifier_dir / cls.model,
        golden_inputs=golden.inputs, golden_outputs=golden.outputs, atol=cls.golden.atol,
        max_latency_ms=cls.golden.max_latency_ms, extra_files=extra, metrics=cls.metrics,
        provenance={**cls.provenance, "detector_from": det.release_name,
                    "detector_metrics": {k: det.metrics.get(k) for k in (
                        "test_mean_auroc", "threshold", "target_fpr", "test_fpr")}},
        detector=DetectorSpec(**spec.model_dump()))
