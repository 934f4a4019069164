"""Object detectors on devices: the bundle's detection section and golden boxes, the health
check by IoU matching, `POST /predict` with boxes in image pixels, and a real rollout (server,
TUF, agent process, onnxruntime): a healthy detector commits, one whose boxes moved rolls
back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgewise.agent import LocalApi, OnnxModel, agent_status, health_check
from edgewise.agent._detect import golden_box_agreement, match_boxes
from edgewise.artifacts import (
    BundleError,
    ObjectDetectionSpec,
    load_golden,
    parse_manifest,
    read_manifest,
    validate_bundle,
    write_bundle,
)
from edgewise.ml import DatasetError, MLError
from edgewise.ml.detect import (
    DetectionDataset,
    export_detector_onnx,
    write_coco,
    write_detector_bundle,
)
from edgewise.ml.detect._train import detector_contract
from edgewise.ml.evaluate import evaluate_bundle
from edgewise.sim import edgewise_command
from tests._detect import CLASSES, SCENES, SQUARE, BlobDetector, make_detector_bundle, png, scene
from tests.test_e2e_update import run_once

SPEC = ObjectDetectionSpec(max_detections=10, min_score=0.4, iou_threshold=0.5,
                           min_recall=0.9, min_precision=0.9)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detector-bundles")
    return {"good": make_detector_bundle(root / "good"),
            "shift": make_detector_bundle(root / "shift", version="2.0.0", broken="shift"),
            "zero": make_detector_bundle(root / "zero", version="3.0.0", broken="zero")}


def test_match_boxes_label_iou_and_one_to_one() -> None:
    ref = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    boxes = np.array([[1, 0, 11, 10], [0, 0, 10, 10], [30, 30, 40, 40]], np.float32)
    # The first reference takes the exact box; the second gets the shifted one (IoU 0.82).
    pairs = match_boxes(ref, np.array([0, 0]), boxes, np.array([0, 0, 0]), 0.5)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1), (1, 0)]
    assert pairs[1][2] == pytest.approx(90 / 110)
    assert match_boxes(ref[:1], np.array([1]), boxes, np.array([0, 0, 0]), 0.5) == []
    assert match_boxes(ref[:1], np.array([0]), boxes[:1], np.array([0]), 0.9) == []


def test_golden_agreement_recall_precision_and_score_floor() -> None:
    # One image: a confident golden box, one near the floor, padding.
    expected = np.array([[[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.25, 1],
                          [0, 0, 0, 0, 0, -1]]], np.float32)
    # The confident box found slightly moved; the weak one now scores 0.45: a detection,
    # and a true one (its golden counterpart scored above the floor of 0.2).
    found = [(np.array([[1, 0, 11, 10], [20, 21, 30, 31]]), np.array([0.8, 0.45]),
              np.array([0, 1]))]
    m = golden_box_agreement(expected, found, SPEC)
    assert (m["golden_boxes"], m["found"], m["detections"], m["true_detections"]) == (1, 1, 2, 2)
    assert m["recall"] == 1.0 and m["precision"] == 1.0 and m["max_shift_px"] == 1.0
    # A golden box found only below the floor is missed; a new confident box is a false one.
    found = [(np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), np.array([0.1, 0.7]),
              np.array([0, 2]))]
    m = golden_box_agreement(expected, found, SPEC)
    assert m["recall"] == 0.0 and m["precision"] == 0.0 and m["detections"] == 1


def test_bundle_layout_and_manifest_rules(bundles) -> None:
    good = bundles["good"]
    manifest = validate_bundle(good)
    assert manifest.kind == "object-detector" and manifest.labels == CLASSES
    assert manifest.requires == ("object-detection",)
    assert manifest.preprocessing.input_name == "image"
    assert manifest.preprocessing.input_shape() == (1, 3, 64, 64)
    golden = load_golden(good, manifest)
    # The three scenes with squares (of four candidates), their boxes exact: 6 squares.
    assert golden.inputs.shape == (3, 3, 64, 64) and golden.outputs.shape[2] == 6
    rows = golden.outputs.reshape(-1, 6)
    rows = rows[rows[:, 5] >= 0]
    assert len(rows) == 6 and (rows[:, 4] > 0.8).all()
    assert [0, 8, 8, 32, 32] in [[r[5], *r[:4]] for r in rows.round(3).tolist()]
    assert sorted(p for p in manifest.files if p.startswith("golden/")) == \
        ["golden/00.png", "golden/01.png", "golden/02.png"]
    assert json.loads((good / "detector.json").read_text())["input"]["shape"] == [1, 3, 64, 64]

    raw = json.loads((good / "edgewise.json").read_text())
    with pytest.raises(BundleError, match="must require the reader feature 'object-detection'"):
        parse_manifest(json.dumps({**raw, "requires": []}))
    with pytest.raises(BundleError, match="has a detection section, and only it"):
        parse_manifest(json.dumps({k: v for k, v in raw.items() if k != "detection"}))
    with pytest.raises(BundleError, match="min_recall"):
        parse_manifest(json.dumps({**raw, "detection": {**raw["detection"], "min_recall": 2}}))
    # Golden outputs that are not box rows are refused when the bundle is written.
    with pytest.raises(BundleError, match=r"\[count, M, 6\] box rows"):
        write_bundle(good.parent / "bad-golden", name="blobs", version="9", labels=CLASSES,
                     preprocessing=manifest.preprocessing, model=good / "model.onnx",
                     golden_inputs=golden.inputs, golden_outputs=golden.outputs[:, :, :4],
                     atol=1.0, max_latency_ms=250, kind="object-detector",
                     detection=manifest.detection,
                     extra_files={"detector.json": good / "detector.json"})


def test_health_check_matches_golden_boxes(bundles) -> None:
    report = health_check(bundles["good"])
    assert report.passed, report.reason
    assert report.extra["recall"] == 1.0 and report.extra["precision"] == 1.0
    assert report.extra["golden_boxes"] == 6 and report.top1_agreement == 1.0

    shifted = health_check(bundles["shift"])
    assert not shifted.passed
    assert "found 0 of 6 golden boxes" in shifted.reason and "precision 0%" in shifted.reason

    zeroed = health_check(bundles["zero"])
    assert not zeroed.passed and zeroed.extra["detections"] == 0
    assert "found 0 of 6 golden boxes" in zeroed.reason


def test_bundle_refuses_a_detector_that_finds_nothing(tmp_path: Path) -> None:
    dead = BlobDetector(broken="zero").eval()
    onnx = export_detector_onnx(dead, tmp_path / "dead.onnx")
    with pytest.raises(MLError, match="finds no box scoring >= 0.3 on any of 4 images"):
        write_detector_bundle(tmp_path / "b", model=onnx, contract=detector_contract(dead,
                                                                                     CLASSES),
                              images=[scene(s) for s in SCENES], name="dead", version="1")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_predict_gives_boxes_in_image_pixels(bundles) -> None:
    # A 128 px photo of the first scene: the model sees it at 64 px, boxes come back x2.
    pred = OnnxModel(bundles["good"]).predict(png(scene(SCENES[0], size=128)))
    out = pred.to_json()
    assert out["kind"] == "object-detector" and out["image_size"] == [128, 128]
    got = {d["label"]: [d["x1"], d["y1"], d["x2"], d["y2"]] for d in out["detections"]}
    assert set(got) == {"red", "green"}
    np.testing.assert_allclose(got["red"], [16, 16, 64, 64], atol=0.5)
    np.testing.assert_allclose(got["green"], [64, 64, 112, 112], atol=0.5)
    assert all(d["score"] >= read_manifest(bundles["good"]).detection.min_score
               for d in out["detections"])


def test_eval_scores_a_detector_bundle_by_map(bundles, tmp_path: Path) -> None:
    # Ground truth at 128 px (the bundle's input is 64 px: boxes are scaled back).
    images, boxes, labels = [], [], []
    for squares in SCENES[:3]:
        images.append(scene(squares, size=128))
        boxes.append(np.array([[2 * x, 2 * y, 2 * (x + SQUARE), 2 * (y + SQUARE)]
                               for _, x, y in squares], np.float32))
        labels.append(np.array([CLASSES.index(c) for c, _, _ in squares], np.int64))
    gt = DetectionDataset(tuple(images), tuple(boxes), tuple(labels), CLASSES,
                          ("a.png", "b.png", "c.png"), "squares")
    write_coco(gt, tmp_path / "coco")
    good = evaluate_bundle(bundles["good"], str(tmp_path / "coco"))
    assert good["kind"] == "object-detector" and good["images"] == 3
    assert good["map50"] == 1.0 and good["map50_95"] > 0.9
    assert evaluate_bundle(bundles["shift"], str(tmp_path / "coco"))["map50"] == 0.0
    with pytest.raises(DatasetError, match="is an object detector: pass --data"):
        evaluate_bundle(bundles["good"])


def test_cli_validate_and_eval_describe_a_detector(bundles) -> None:
    from typer.testing import CliRunner

    from edgewise.cli import _app

    runner = CliRunner()
    result = runner.invoke(_app.app, ["bundle", "validate", str(bundles["good"])])
    assert result.exit_code == 0, result.output
    assert "object detector, 3 classes, 3 golden images (IoU >= 0.5" in result.output
    result = runner.invoke(_app.app, ["eval", str(bundles["good"])])
    assert result.exit_code == 1 and "is an object detector: pass --data" in result.output


def test_detector_rollout_commits_then_moved_boxes_roll_back(live_server, enroll_agent,
                                                               bundles, tmp_path: Path) -> None:
    state = enroll_agent("cam")
    live_server.publish(bundles["good"])
    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert status["state"] == "committed" and status["release"] == "blobs@1.0.0"
    assert status["last_health"]["recall"] == 1.0

    # Served: the local API and `agent predict --draw`, on the device only.
    image = tmp_path / "street.png"
    image.write_bytes(png(scene(SCENES[2], size=96)))
    api = LocalApi(state, port=0)
    api.start()
    try:
        r = httpx.post(f"http://127.0.0.1:{api.port}/predict", content=image.read_bytes())
        assert r.status_code == 200, r.text
        found = sorted((d["label"], round(d["x1"])) for d in r.json()["detections"])
        assert found == [("blue", 36), ("green", 0), ("red", 60)]
    finally:
        api.stop()
    result = subprocess.run(edgewise_command("agent", "predict", str(image), "--state",
                                             str(state), "--draw", str(tmp_path / "drawn")),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(answer["detections"]) == 3 and answer["release"] == "blobs@1.0.0"
    drawn = Path(answer["drawn"]).read_bytes()
    assert drawn.startswith(b"\x89PNG") and drawn != image.read_bytes()

    live_server.publish(bundles["shift"])
    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert status["state"] == "rolled-back" and status["release"] == "blobs@1.0.0"
    assert "health check failed: found 0 of 6 golden boxes" in status["last_error"]
    assert status["last_health"]["recall"] == 0.0
