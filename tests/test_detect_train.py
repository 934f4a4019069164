"""The detector's training run as users drive it: pause and resume (the resumed run ends
where an uninterrupted one does), MLflow through the classifier's tracking seam, the bundle
written at the end (and health-checked by the agent's own check), and `edgewise train --task
detect`."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from edgewise.agent import health_check
from edgewise.artifacts import validate_bundle
from edgewise.ml import MLError
from edgewise.ml.detect import DetectConfig, SynthConfig, synth_scenes, train_detector, write_coco
from edgewise.ml.tracking import EXPERIMENT, default_tracking_uri
from edgewise.sim import edgewise_command


@pytest.fixture(scope="module")
def scenes():
    return synth_scenes(SynthConfig(scenes=12, size_px=64, min_object_frac=0.2, seed=2))


@pytest.mark.slow
def test_pause_resume_tracking_and_bundle(scenes, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # One thread and a budget that never binds: the schedule follows the steps, and the
    # arithmetic is the same in every session.
    cfg = DetectConfig(data="", out_dir=str(out), input_size=64, max_steps=6, batch_size=4,
                       val_every_s=1e9, time_budget_s=1e7, track=True, name="scenes",
                       bundle_min_score=0.06, threads=1)
    paused = train_detector(replace(cfg, stop_after_steps=3), dataset=scenes)
    assert paused.paused and paused.metrics["steps"] == 3
    assert {p.name for p in out.iterdir()} == {"last.pt", "mlflow.db"}  # nothing exported
    with pytest.raises(MLError, match="unfinished run; continue it with --resume"):
        train_detector(cfg, dataset=scenes)
    with pytest.raises(MLError, match=r"cannot resume: .*\['lr'\]"):
        train_detector(replace(cfg, resume=True, lr=1e-3), dataset=scenes)

    done = train_detector(replace(cfg, resume=True), dataset=scenes)
    assert not done.paused and done.metrics["steps"] == 6
    assert not (out / "last.pt").exists()
    for name in ("model.onnx", "best.pt", "metrics.json", "detector.json", "config.json"):
        assert (out / name).is_file()
    from PIL import Image

    assert done.metrics["val_images"] == 5
    with Image.open(out / "val_detections.png") as grid:  # 5 images of 64 px, 4 a row
        assert grid.size == (4 * 64, 2 * 64)

    # The same six steps without a pause reach the same weights (optimiser, RNGs, frozen
    # blocks and schedule all carried over), and no bundle where nothing scores 0.99.
    straight = train_detector(replace(cfg, out_dir=str(tmp_path / "straight"), track=False,
                                      bundle_min_score=0.99), dataset=scenes)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(done.model.state_dict()[key], value), key
    assert straight.bundle_dir is None and not (tmp_path / "straight" / "bundle").exists()
    assert "no bundle written" in straight.metrics["warnings"][0]

    # The bundle of the finished run: golden boxes from validation images, and the device's
    # own health check passes on the trained graph.
    assert done.bundle_dir == out / "bundle"
    manifest = validate_bundle(done.bundle_dir)
    assert manifest.name == "scenes" and manifest.kind == "object-detector"
    assert "val_detections.png" in manifest.files
    assert manifest.labels == scenes.class_names
    assert manifest.metrics["val_map50"] == done.metrics["val_map50"]
    report = health_check(done.bundle_dir)
    assert report.passed and report.extra["recall"] == 1.0, report.reason

    # MLflow: both sessions recorded, the finished one with its metrics and bundle.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_tracking_uri(out))
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    last = max(runs, key=lambda r: r.info.start_time)
    assert last.data.params["task"] == "detect" and last.data.params["resumed_at_step"] == "3"
    assert last.data.metrics["val_map50"] == pytest.approx(done.metrics["val_map50"])
    assert json.loads((out / "metrics.json").read_text())["bundle"] == str(out / "bundle")


def test_out_folder_rules(tmp_path: Path) -> None:
    from edgewise.ml.detect._train import _check_out_dir

    out = tmp_path / "run"
    assert _check_out_dir(out, resume=False) is None
    out.mkdir()
    (out / "mlflow.db").write_bytes(b"")  # a run stopped before its first checkpoint
    assert _check_out_dir(out, resume=False) is None
    with pytest.raises(MLError, match="nothing to resume"):
        _check_out_dir(out, resume=True)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MLError, match="exists and is not empty"):
        _check_out_dir(out, resume=False)
    (out / "last.pt").write_bytes(b"")
    with pytest.raises(MLError, match="unfinished run"):
        _check_out_dir(out, resume=False)
    assert _check_out_dir(out, resume=True) == out / "last.pt"


def test_train_task_detect_refuses_classifier_options(tmp_path: Path) -> None:
    result = subprocess.run(edgewise_command("train", "--task", "detect", "--data",
                                             str(tmp_path), "--epochs", "3", "--balance",
                                             "auto", "--out", str(tmp_path / "o")),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "--epochs, --balance: classifier options, not used by --task detect" in result.stderr
    # --augment is shared, with the detector's own presets
    result = subprocess.run(edgewise_command("train", "--task", "detect", "--data",
                                             str(tmp_path), "--augment", "strong", "--out",
                                             str(tmp_path / "o")),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "unknown augmentation 'strong' (known: none, flip, default)" in result.stderr


@pytest.mark.slow
def test_train_task_detect_cli(scenes, tmp_path: Path) -> None:
    write_coco(scenes, tmp_path / "data")
    result = subprocess.run(edgewise_command(
        "train", "--task", "detect", "--data", str(tmp_path / "data"), "--out",
        str(tmp_path / "out"), "--time-budget", "4s", "--resolution", "64", "--batch-size", "4",
        "--no-tracking", "--threads", "1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] >= 1 and 0 <= summary["val_map50"] <= 1
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["input_size"], config["batch_size"], config["track"], config["threads"]) \
        == (64, 4, False, 1)
    assert not (tmp_path / "out" / "mlflow.db").exists()


@pytest.mark.slow
def test_ema_weights_are_checkpointed_validated_and_exported(scenes, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = DetectConfig(data="", out_dir=str(out), input_size=64, max_steps=2, batch_size=4,
                       val_every_s=1e9, time_budget_s=1e7, track=False, name="scenes",
                       bundle_min_score=0.99, threads=1, ema=True)
    train_detector(replace(cfg, stop_after_steps=1), dataset=scenes)
    first = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    # One update from the heatmap's prior bias (-log 9 everywhere), at the warm-up decay
    # min(decay, (1 + n) / (10 + n)) = 2/11 for n = 1.
    prior = torch.full_like(first["model"]["heat.2.bias"], -math.log(9))
    assert first["ema_updates"] == 1
    assert torch.allclose(first["ema"]["heat.2.bias"],
                          prior * 2 / 11 + first["model"]["heat.2.bias"] * 9 / 11, atol=1e-6)

    train_detector(replace(cfg, resume=True, stop_after_steps=2), dataset=scenes)
    second = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert second["ema_updates"] == 2
    done = train_detector(replace(cfg, resume=True), dataset=scenes)  # budget spent: export
    assert done.metrics["steps"] == 2
    exported = torch.load(out / "best.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(exported["heat.2.bias"], second["ema"]["heat.2.bias"])
    assert not torch.equal(exported["heat.2.bias"], second["model"]["heat.2.bias"])


def test_training_batches_reach_the_model_channels_last(scenes, tmp_path: Path) -> None:
    # The zoom/shift augmentation resamples into NCHW; oneDNN trains ~1.5x slower on that
    # than on the NHWC layout every other batch has, so the loop converts each batch.
    from edgewise.ml.detect import CenterNetDetector

    layouts = []

    def record(module, args):
        if isinstance(module, CenterNetDetector) and module.training:
            layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train_detector(DetectConfig(data="", out_dir=str(tmp_path / "run"), input_size=64,
                                    max_steps=4, stop_after_steps=2, batch_size=4,
                                    val_every_s=1e9, time_budget_s=1e7, threads=1,
                                    augment="default"), dataset=scenes)
    finally:
        hook.remove()
    assert layouts == [True, True]
