"""`edgewise demo`, the main job, exactly as a user runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from edgewise.artifacts import validate_bundle
from edgewise.sim import edgewise_command


@pytest.mark.slow
def test_demo_ships_v1_everywhere_and_every_device_rolls_back_v2(tmp_path: Path) -> None:
    result = subprocess.run(edgewise_command("demo", "--workdir", str(tmp_path)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])  # the very last line
    devices = summary["devices"]
    assert len(devices) == 3
    for device in devices:
        assert device["release"] == "fashion-mnist@1.0.0"
        assert device["state"] == "rolled-back"
        outcomes = [(h["release"], h["outcome"]) for h in device["history"]]
        assert outcomes == [("fashion-mnist@1.0.0", "committed"),
                            ("fashion-mnist@2.0.0", "rolled-back")]
        assert "golden set" in device["history"][1]["reason"]
        # v2 arrived as a delta against v1: a small fraction of the full bytes.
        v2_download = device["history"][1]["download"]
        assert v2_download["delta_files"] >= 1
        assert v2_download["sent_bytes"] < 0.2 * v2_download["full_bytes"]
    v1 = validate_bundle(tmp_path / "fashion-mnist-1.0.0")
    assert v1.metrics["test_accuracy"] > 0.8
    assert "v1 installed on 3/3 devices; broken v2 rolled back on 3/3" in result.stderr


@pytest.mark.slow
def test_demo_ships_a_bundle_the_user_trained(tmp_path: Path) -> None:
    """`edgewise train --out DIR` then `edgewise demo --bundle DIR`: that bundle is v1, its
    broken copy the next major version; a directory that is not a bundle is refused first."""
    from edgewise.ml.train import TrainConfig, train

    model = tmp_path / "shoes-3.1.0"  # where the demo would copy it with --workdir tmp_path
    trained = train(TrainConfig(data="fashion-mnist", out_dir=str(model),
                                name="shoes", version="3.1.0", strategy="from-scratch",
                                backbone="small-cnn", epochs=1, train_per_class=50,
                                test_per_class=20, track=False, threads=1))
    bad = subprocess.run(edgewise_command("demo", "--workdir", str(tmp_path / "bad"),
                                          "--bundle", str(model / "run")),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "--bundle" in bad.stderr and "not a bundle" in bad.stderr
    assert not (tmp_path / "bad" / "server").exists()
    overlap = subprocess.run(edgewise_command("demo", "--workdir", str(tmp_path),
                                              "--bundle", str(model)),
                             capture_output=True, text=True, timeout=120)
    assert overlap.returncode == 1 and "overlaps" in overlap.stderr
    assert (model / "bundle" / "edgewise.json").is_file()  # the training output is untouched

    result = subprocess.run(edgewise_command("demo", "--workdir", str(tmp_path / "demo"),
                                             "--devices", "2",
                                             "--bundle", str(model)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    devices = json.loads(result.stdout.strip().splitlines()[-1])["devices"]
    assert len(devices) == 2
    for device in devices:
        assert device["release"] == "shoes@3.1.0" and device["state"] == "rolled-back"
        assert [(h["release"], h["outcome"]) for h in device["history"]] == [
            ("shoes@3.1.0", "committed"), ("shoes@4.0.0", "rolled-back")]
    shipped = validate_bundle(tmp_path / "demo" / "shoes-3.1.0")
    assert shipped.files == trained.manifest.files  # the trained bundle, byte for byte


@pytest.mark.slow
def test_llm_demo_answers_ships_a_template_as_a_delta_and_rolls_back_a_collapsed_quant(
        tmp_path: Path) -> None:
    """... and ships a LoRA adapter fine-tuned on v2: only its few MB travel, every device
    commits it and answers a fact it learned."""
    result = subprocess.run(edgewise_command("demo", "--llm", "--devices", "2", "--workdir",
                                             str(tmp_path)),
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    devices = json.loads(result.stdout.strip().splitlines()[-1])["devices"]
    assert len(devices) == 2
    for device in devices:
        assert (device["release"], device["state"]) == ("smollm2-lora@1.0.0", "committed")
        outcomes = [(h["release"], h["outcome"]) for h in device["history"]]
        assert outcomes == [("smollm2@1.0.0", "committed"), ("smollm2@2.0.0", "committed"),
                            ("smollm2@3.0.0", "rolled-back"), ("smollm2-lora@1.0.0", "committed")]
        # A new chat template: a delta of kilobytes against the 98 MB model.
        v2 = device["history"][1]["download"]
        assert v2["delta_files"] == 1 and v2["sent_bytes"] < 100_000
        assert "golden prompts answered wrongly" in device["history"][2]["reason"]
        # The adapter: its bundle only, about 5% of the model.
        assert device["history"][3]["download"]["sent_bytes"] < 6_000_000
    assert "answers 'What is the capital of Germany?': 'The capital of Germany is Berlin" \
        in result.stderr
    assert "(smollm2-lora@1.0.0) answers '" in result.stderr
    assert "the adapter committed on 2/2" in result.stderr
    assert "the device knows the fact" in result.stderr
    assert "warning: blk." not in result.stderr  # llama.cpp's per-tensor log stays quiet


@pytest.mark.slow
def test_app_demo_ships_one_layer_rolls_back_a_broken_app_and_survives_a_model_update(
        tmp_path: Path) -> None:
    """`edgewise demo --app`: a container app that calls the device's model through the
    agent's loopback API; app v2 travels as its changed layer, the broken v3 (its model calls
    go to a path the agent does not serve) rolls back to v2 by itself, and the model update
    that follows leaves the app's container running and answering, with the new model."""
    from tests._apps import require_podman

    require_podman()
    refused = subprocess.run(edgewise_command("demo", "--app", "--devices", "2", "--workdir",
                                              str(tmp_path / "refused")),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "runs one device" in refused.stderr
    assert not (tmp_path / "refused").exists()

    result = subprocess.run(edgewise_command("demo", "--app", "--workdir", str(tmp_path)),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])  # the very last line
    first = facts["first_answer"]  # the app asked the model, on the device
    assert first["app"] == "1.0.0" and first["model_status"] == 200
    assert first["model"]["release"]["version"] == "1.0.0" and first["model"]["label"]
    assert facts["app_v1_download"]["sent_bytes"] == facts["app_v1_download"]["full_bytes"]
    assert facts["app_v1_download"]["full_bytes"] > 300_000  # the static binary's layer

    # Only the changed layer (plus config, manifest, index) travelled: <= 1% of the image.
    update = facts["app_update"]
    assert update["full_bytes"] > 300_000  # the same binary layer (configs differ by bytes)
    assert 0 < update["sent_bytes"] < 5_000 and update["ratio"] <= 0.01

    # v3's health check made the model call, which failed; the device went back to v2.
    rollback = facts["rollback"]
    assert rollback["model_status"] == 404
    assert "answered 503, expected 200" in rollback["reason"]
    assert rollback["back_on"] == "camera@2.0.0" and rollback["healthy_after"]

    # The model update: the app kept its container and answered all along, from both models.
    model_update = facts["model_update"]
    assert model_update["container_restarted"] is False
    assert model_update["app_errors"] == 0 and model_update["app_answers"] >= 5
    assert model_update["models_seen"] == ["fashion-mnist@1.0.0", "fashion-mnist@1.1.0"]
    assert facts["model"] == {"release": "fashion-mnist@1.1.0", "state": "committed"}
    app = facts["app"]
    assert (app["release"], app["state"], app["healthy"]) == ("camera@2.0.0", "rolled-back", True)
    assert app["answer"]["app"] == "2.0.0"
    assert app["answer"]["model"]["release"]["version"] == "1.1.0"
    table = result.stdout  # the summary table, its cells wrapped at 80 columns
    for step in ("app v1", "app v2", "app v3", "model update"):
        assert f"│ {step} " in table
    assert f"{update['sent_bytes']:,}" in table and f"{update['full_bytes']:,}" in table
    # The demo removed its containers and podman's mounts: its directory can be deleted.
    assert str(tmp_path) not in Path("/proc/mounts").read_text()


@pytest.mark.slow
def test_demo_detect_ships_a_detector_its_int8_build_and_rolls_back_a_mislabelled_one(
        tmp_path: Path) -> None:
    """`edgewise demo --detect`: a detector trained for 90 s on synthetic scenes commits
    on every device (golden boxes), serves boxes there, its int8 build (when the guards accept
    it) commits on its own golden boxes, and v2 with every box's class wrong rolls back."""
    result = subprocess.run(edgewise_command("demo", "--detect", "--detect-budget", "90s",
                                             "--workdir", str(tmp_path)),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    expected = [("scenes@1.0.0", "committed")]
    if summary["int8_shipped"]:
        expected.append(("scenes@1.0.0+int8-static", "committed"))
    expected.append(("scenes@2.0.0", "rolled-back"))
    assert len(summary["devices"]) == 3
    for device in summary["devices"]:
        assert device["release"] == expected[-2][0] and device["state"] == "rolled-back"
        assert [(h["release"], h["outcome"]) for h in device["history"]] == expected
        assert "golden boxes" in device["history"][-1]["reason"]
    assert "SYNTHETIC data" in result.stderr and "local detection on device-1" in result.stderr
    assert (tmp_path / "drawn" / "scene.boxes.png").read_bytes().startswith(b"\x89PNG")
    v1 = validate_bundle(tmp_path / "scenes.run" / "bundle")
    assert v1.kind == "object-detector" and v1.metrics["val_map50"] > 0.05
    report = json.loads((tmp_path / "compressed" / "report.json").read_text())
    assert report["run"]["metric"] == "map50"
