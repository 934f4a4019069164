"""Generative models: a tiny cVAE trained for seconds, exported, calibrated, shipped as a
bundle and run by the agent (anomaly aggregates, generation)."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgewise.agent import DriftLog, LocalModel, health_check
from edgewise.agent._slots import SlotStore
from edgewise.agent._store import StateDir
from edgewise.artifacts import BundleError, parse_manifest, validate_bundle
from edgewise.ml.data import FASHION_MNIST_ROOT, load_idx_dataset
from edgewise.ml.gen import (
    ConvVAE,
    DecoderGraph,
    GenConfig,
    ScoreGraph,
    auroc,
    make_ood,
    ort_scores,
    threshold_for_fpr,
    train_generative,
)
from edgewise.ml.quick import FASHION_MNIST_PREPROCESSING, preprocess_images
from edgewise.sim import edgewise_command

needs_data = pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(),
                                reason="Fashion-MNIST not installed (dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    if not FASHION_MNIST_ROOT.is_dir() and not os.environ.get("CI"):
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path_factory.mktemp("cvae")
    result = train_generative(GenConfig(kind="cvae", out_dir=str(out), time_budget_s=15,
                                        epochs=1, train_limit=3000, val_limit=1000,
                                        report_n=800,
                                        track=False))
    return out, result.metrics


@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, np.ndarray]:
    if not FASHION_MNIST_ROOT.is_dir() and not os.environ.get("CI"):
        pytest.skip("Fashion-MNIST not installed")
    return load_idx_dataset(FASHION_MNIST_ROOT, "test")


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_auroc_and_threshold_helpers() -> None:
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    scores = np.arange(1000, dtype=float)
    t = threshold_for_fpr(scores, 0.05)
    assert (scores > t).mean() == pytest.approx(0.05, abs=0.002)


def test_score_graph_export_matches_torch(tmp_path: Path) -> None:
    from edgewise.ml.gen._train import _export

    torch.manual_seed(0)
    vae = ConvVAE(latent_dim=4, num_classes=3, width=8).eval()
    graph = ScoreGraph(vae, latent_mean=torch.zeros(4), latent_prec=torch.eye(4),
                       norm=(1.0, 2.0, 3.0, 4.0), method="combined").eval()
    x = torch.randn(5, 1, 28, 28)
    _export(graph, (x[:2],), tmp_path / "s.onnx", ["input"],
            ["score", "recon_error", "latent_distance"])
    got = ort_scores(tmp_path / "s.onnx", x.numpy())
    with torch.inference_mode():
        want = torch.stack(graph(x), 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the combined score really is the standardised sum of the two parts
    np.testing.assert_allclose(want[:, 0], (want[:, 1] - 1) / 2 + (want[:, 2] - 3) / 4,
                               rtol=1e-5)


@needs_data
def test_bundle_validates_and_passes_health_check(trained) -> None:
    out, metrics = trained
    manifest = validate_bundle(out / "bundle")
    assert manifest.kind == "generator"
    assert manifest.detector is not None and manifest.generator is not None
    assert manifest.generator.conditional and manifest.generator.model == "decoder.onnx"
    assert manifest.detector.threshold == pytest.approx(metrics["threshold"])
    assert manifest.metrics["score_method"] in ("reconstruction", "latent", "combined")
    report = health_check(out / "bundle")
    assert report.passed, report.reason


@needs_data
def test_decoder_onnx_matches_torch(trained) -> None:
    from safetensors.torch import load_file

    out, _ = trained
    vae = ConvVAE(latent_dim=16, num_classes=10)
    vae.load_state_dict(load_file(str(out / "run" / "vae.safetensors")))
    stats = load_file(str(out / "run" / "latent_gaussians.safetensors"))
    assert stats["mean"].shape == (10, 16) and stats["chol"].shape == (10, 16, 16)
    import onnxruntime as ort

    z = torch.randn(6, 16)
    label = torch.eye(10)[[0, 1, 2, 7, 8, 9]]
    sess = ort.InferenceSession(str(out / "bundle" / "decoder.onnx"),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {"z": z.numpy(), "label": label.numpy()})[0]
    with torch.inference_mode():
        want = DecoderGraph(vae.eval(), latent_mean=stats["mean"],
                            latent_chol=stats["chol"])(z, label).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


@needs_data
def test_score_separates_in_from_out_of_distribution(trained, test_images) -> None:
    out, _ = trained
    images = test_images[0][5000:5600]
    x_in = preprocess_images(images, FASHION_MNIST_PREPROCESSING)
    s_in = ort_scores(out / "bundle" / "model.onnx", x_in)[:, 0]
    results = {}
    for kind in ("noise", "inverted", "digits"):
        ood = make_ood(kind, 300, source=test_images[0][6000:7000], seed=9)
        s_out = ort_scores(out / "bundle" / "model.onnx",
                           preprocess_images(ood, FASHION_MNIST_PREPROCESSING))[:, 0]
        results[kind] = auroc(s_in, s_out)
    assert results["noise"] > 0.9 and results["inverted"] > 0.9, results
    assert np.mean(list(results.values())) > 0.75, results


@needs_data
def test_threshold_gives_target_fpr_on_held_out_images(trained, test_images) -> None:
    out, _ = trained
    manifest = validate_bundle(out / "bundle")
    held_out = preprocess_images(test_images[0][3000:6000], FASHION_MNIST_PREPROCESSING)
    scores = ort_scores(out / "bundle" / "model.onnx", held_out)[:, 0]
    fpr = float((scores > manifest.detector.threshold).mean())
    assert abs(fpr - manifest.detector.target_fpr) < 0.03, fpr


def _install(bundle: Path, state: Path) -> None:
    slots = SlotStore(StateDir(state).slots_dir)
    slots.install("a", bundle, meta={"name": "fashion-cvae", "version": "1.0.0"})
    slots.activate("a")


@needs_data
def test_agent_scores_inputs_and_keeps_only_aggregates(trained, test_images,
                                                       tmp_path: Path) -> None:
    out, _ = trained
    state = tmp_path / "state"
    _install(out / "bundle", state)
    model = LocalModel(state)
    images = test_images[0][7000:7040]
    rng = np.random.default_rng(1)
    normal = [model.predict(png(img))[0] for img in images]
    noisy = [model.predict(png(rng.integers(0, 256, (28, 28))))[0] for _ in range(20)]
    assert all(p.anomaly is not None for p in normal + noisy)
    assert sum(p.anomaly["anomalous"] for p in noisy) >= 18
    assert sum(p.anomaly["anomalous"] for p in normal) <= 8
    assert normal[0].to_json()["anomaly"]["threshold"] == pytest.approx(
        model.model().manifest.detector.threshold)

    summary = DriftLog(state).summary()
    assert summary["inputs"] == 60
    assert summary["anomalous"] == sum(p.anomaly["anomalous"] for p in normal + noisy)
    assert sum(summary["histogram"]) == 60
    # What is stored (and may be reported) holds counts per hour, nothing per image.
    raw = json.loads((state / "drift.json").read_text())
    for row in raw["hours"].values():
        assert set(row) == {"n", "anomalous", "histogram"}
    assert len(raw["hours"]) <= 2  # one row per hour (two if the test straddles an hour)
    assert set(raw) == {"release", "threshold", "target_fpr", "edges", "hours"}


@needs_data
def test_agent_generate_writes_png_grid(trained, tmp_path: Path) -> None:
    out, _ = trained
    state = tmp_path / "state"
    _install(out / "bundle", state)
    grid = tmp_path / "grid.png"
    result = subprocess.run(edgewise_command("agent", "generate", "--state", str(state),
                                             "--class", "Trouser", "-n", "16", "--out",
                                             str(grid)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["n"] == 16 and answer["latency_ms"] > 0
    with Image.open(grid) as img:
        pixels = np.asarray(img)
    assert pixels.shape == (2 * (4 * 30 + 2), 2 * (4 * 30 + 2))
    assert pixels.std() > 10  # not a blank image

    bad = subprocess.run(edgewise_command("agent", "generate", "--state", str(state),
                                          "--class", "Spaceship", "--out", str(grid)),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown class" in (bad.stdout + bad.stderr)


def test_manifest_sections_are_optional_and_checked(tmp_path: Path) -> None:
    from tests.conftest import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "tiny")
    text = (bundle / "edgewise.json").read_text()
    assert '"detector"' not in text and '"generator"' not in text  # old readers unaffected
    raw = json.loads(text)
    raw["kind"] = "generator"
    with pytest.raises(BundleError, match="generator section"):
        parse_manifest(json.dumps(raw))
    raw["kind"] = "image-classifier"
    raw["detector"] = {"model": "other.onnx", "method": "latent", "threshold": 1.0,
                       "target_fpr": 0.05, "histogram_edges": [0.0, 1.0]}
    with pytest.raises(BundleError, match="not listed"):
        parse_manifest(json.dumps(raw))
    raw["detector"]["model"] = raw["model"]
    raw["detector"]["histogram_edges"] = [1.0, 0.5]
    with pytest.raises(BundleError, match="increasing"):
        parse_manifest(json.dumps(raw))


@pytest.mark.slow
@needs_data
def test_gen_train_cli_vae_with_mlflow(tmp_path: Path) -> None:
    result = subprocess.run(edgewise_command("gen", "train", "--kind", "vae", "--out",
                                             str(tmp_path / "m"), "--time-budget", "12s",
                                             "--epochs", "1", "--train-limit", "2000"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["mlflow_run_id"] and (tmp_path / "m" / "run" / "mlflow.db").is_file()
    manifest = validate_bundle(tmp_path / "m" / "bundle")
    assert manifest.generator is not None and not manifest.generator.conditional


@needs_data
def test_learn_normal_fits_the_devices_own_images(trained, test_images, tmp_path: Path) -> None:
    from edgewise.agent import AgentConfigError, learn_normal

    out, _ = trained
    state = tmp_path / "state"
    _install(out / "bundle", state)
    # This device's camera is darker than the training data: a shift it should learn as normal.
    own = tmp_path / "own"
    own.mkdir()
    for i, img in enumerate(test_images[0][8000:8100]):
        (own / f"{i}.png").write_bytes(png(img * 0.7))
    model = LocalModel(state)
    with pytest.raises(AgentConfigError, match="at least"):
        learn_normal(state, model.model(), tmp_path / "empty", target_fpr=0.05,
                     time_budget_s=30)
    fitted = learn_normal(state, model.model(), own, target_fpr=0.1, time_budget_s=60)
    assert fitted["images"] == 100 and (state / "detector-local.json").is_file()
    flagged = [model.predict((own / f"{i}.png").read_bytes())[0].anomaly for i in range(100)]
    assert all(a["calibration"] == "device" and a["threshold"] == fitted["threshold"]
               for a in flagged)
    assert sum(a["anomalous"] for a in flagged) == pytest.approx(10, abs=2)


@pytest.mark.slow
@needs_data
def test_generator_bundle_ships_through_the_update_system(trained, live_server, enroll_agent,
                                                         test_images, tmp_path: Path) -> None:
    """Published, signed, installed, health-checked and committed like a classifier; then the
    device scores its inputs and generates, with only aggregates in its status."""
    from edgewise.agent import agent_status
    from tests.test_e2e_update import run_once

    out, _ = trained
    state = enroll_agent("gen")
    live_server.publish(out / "bundle")
    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert status["state"] == "committed" and status["release"].startswith("fashion-cvae@")

    model = LocalModel(state)
    for img in test_images[0][:10]:
        assert model.predict(png(img))[0].anomaly is not None
    drift = agent_status(state)["drift"]
    assert drift["inputs"] == 10 and sum(drift["histogram"]) == 10
    grid = tmp_path / "grid.png"
    result = subprocess.run(edgewise_command("agent", "generate", "--state", str(state),
                                             "--class", "Bag", "-n", "4", "--out", str(grid)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and grid.is_file(), result.stderr


@needs_data
def test_gen_augment_writes_an_image_folder(trained, tmp_path: Path) -> None:
    from edgewise.ml import MLError
    from edgewise.ml.data import load_image_folder
    from edgewise.ml.gen import synthesize

    out, _ = trained
    written = synthesize(out / "bundle", label="Bag", n=12, out_dir=tmp_path / "syn")
    synthesize(out / "bundle", label="T-shirt/top", n=5, out_dir=tmp_path / "syn")
    assert len(written) == 12 and all(p.parent.name == "Bag" for p in written)
    ds = load_image_folder(tmp_path / "syn")
    assert sorted(ds.class_names) == ["Bag", "T-shirt_top"] and len(ds.labels) == 17
    with pytest.raises(MLError, match="unknown class"):
        synthesize(out / "bundle", label="Spaceship", n=1, out_dir=tmp_path / "syn")


@needs_data
def test_train_balances_rare_classes_with_generated_images(trained, tmp_path: Path) -> None:
    """`edgewise train --balance generative` tops the rare classes up with cVAE samples; a
    generator for other classes is refused before any training."""
    from edgewise.ml import MLError
    from edgewise.ml.data import load_idx_dataset, write_idx_dataset
    from edgewise.ml.train import TrainConfig, train

    out, _ = trained
    x, y = load_idx_dataset(split="train")
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.choice(np.nonzero(y == c)[0], 6 if c in (3, 8) else 40,
                                      replace=False) for c in range(10)])
    data = tmp_path / "fashion-rare"
    write_idx_dataset(data, "train", x[keep], y[keep])
    write_idx_dataset(data, "test", x[:200], y[:200])
    said: list[str] = []
    result = train(TrainConfig(data=str(data), out_dir=str(tmp_path / "run"), epochs=1,
                               strategy="from-scratch", backbone="small-cnn", batch_size=32,
                               balance="generative", generator=str(out / "bundle"),
                               track=False, threads=1), notify=said.append)
    added = next(m for m in said if m.startswith("generated training images"))
    assert "Dress +" in added and "Bag +" in added and "Coat" not in added
    assert result.manifest.provenance["balance"] == "generative"
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "digits" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(x[i]).save(tmp_path / "digits" / name / f"{i}.png")
    with pytest.raises(MLError, match="generator's classes"):
        train(TrainConfig(data=str(tmp_path / "digits"), out_dir=str(tmp_path / "r2"),
                          balance="generative", generator=str(out / "bundle"), epochs=1,
                          strategy="from-scratch", backbone="small-cnn", track=False))


def test_latent_gaussians_survive_rare_and_missing_classes() -> None:
    """A class with one sample (or none) in the fitting subset, as in an imbalanced data set,
    still gets a positive-definite covariance (shrunk toward the pooled one)."""
    import torch

    from edgewise.ml.gen._model import fit_latent_gaussians

    torch.manual_seed(0)
    mus = torch.randn(41, 4)
    labels = torch.tensor([0] * 40 + [1])  # class 1: one sample; class 2: none
    means, chols = fit_latent_gaussians(mus, labels, 3)
    assert torch.isfinite(means).all() and torch.isfinite(chols).all()
    torch.testing.assert_close(means[1], mus[40])
    torch.testing.assert_close(means[2], mus.mean(0))


@needs_data
def test_detector_ships_beside_a_classifier(trained, tmp_path: Path) -> None:
    """`edgewise gen attach`: a classifier bundle plus the generator's detector; a local
    prediction carries the same anomaly score the generator bundle gives the image, even when
    the classifier normalises its input differently (an adapter is prepended)."""
    from edgewise.agent import health_check
    from edgewise.agent._runtime import OnnxModel
    from edgewise.ml import MLError
    from edgewise.ml.data import load_idx_dataset
    from edgewise.ml.gen import attach_detector
    from edgewise.ml.train import TrainConfig, train

    gen_dir = trained[0] / "bundle"
    x, y = load_idx_dataset(split="test")
    folder = tmp_path / "shoes"  # its own mean/std: not the generator's contract
    for c, name in ((5, "sandal"), (7, "sneaker")):
        (folder / name).mkdir(parents=True)
        for i, img in enumerate(x[y == c][:30]):
            Image.fromarray(img).save(folder / name / f"{i}.png")
    cls = train(TrainConfig(data=str(folder), out_dir=str(tmp_path / "cls"), epochs=1,
                            strategy="from-scratch", backbone="small-cnn", batch_size=16,
                            track=False, threads=1)).bundle_dir
    assert validate_bundle(cls).preprocessing.mean != validate_bundle(gen_dir).preprocessing.mean
    out = attach_detector(cls, gen_dir, tmp_path / "both", version="1.1.0")
    assert out.detector.model == "detector.onnx" and out.kind == "image-classifier"
    assert health_check(tmp_path / "both").passed

    png = io.BytesIO()
    Image.fromarray(x[0]).save(png, format="PNG")
    combined = OnnxModel(tmp_path / "both").predict(png.getvalue())
    alone = OnnxModel(gen_dir).predict(png.getvalue())
    assert combined.label in ("sandal", "sneaker")
    assert combined.anomaly["score"] == pytest.approx(alone.anomaly["score"], rel=1e-4, abs=1e-4)

    with pytest.raises(MLError, match="not a classifier"):
        attach_detector(gen_dir, gen_dir, tmp_path / "x")
    with pytest.raises(MLError, match="already carries a detector"):
        attach_detector(tmp_path / "both", gen_dir, tmp_path / "y")


def test_device_threshold_survives_an_update_that_keeps_the_detector(tmp_path: Path) -> None:
    from edgewise.agent._anomaly import LOCAL_DETECTOR_FILE, local_threshold

    path = tmp_path / LOCAL_DETECTOR_FILE
    path.write_text(json.dumps({"release": "cls@1.0.0", "detector": "abc:score",
                                "threshold": 2.5}))
    assert local_threshold(tmp_path, "cls@2.0.0", "abc:score") == 2.5  # same detector
    assert local_threshold(tmp_path, "cls@1.0.0", "def:score") is None  # another detector
    path.write_text(json.dumps({"release": "cls@1.0.0", "threshold": 1.5}))  # older file
    assert local_threshold(tmp_path, "cls@1.0.0", "abc:score") == 1.5
    assert local_threshold(tmp_path, "cls@2.0.0", "abc:score") is None
