"""The DDPM: a tiny class-conditional diffusion model trained for seconds, exported (score graph,
unrolled DDIM sampler, denoiser), shipped as a bundle and run by the agent (health check,
generation, denoising, rare-class synthesis)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgewise.agent import LocalModel, denoise_images, generate_images, health_check
from edgewise.agent._slots import SlotStore
from edgewise.agent._store import StateDir
from edgewise.artifacts import BundleError, parse_manifest, validate_bundle
from edgewise.ml.data import FASHION_MNIST_ROOT, load_idx_dataset
from edgewise.ml.gen import DenoiseGraph, GenConfig, TinyUNet, psnr, synthesize, train_generative
from edgewise.ml.gen._ddpm import alpha_bar, time_of
from edgewise.sim import edgewise_command

needs_data = pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(),
                                reason="Fashion-MNIST not installed (dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory) -> tuple[Path, dict]:
    if not FASHION_MNIST_ROOT.is_dir() and not os.environ.get("CI"):
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path_factory.mktemp("ddpm")
    result = train_generative(GenConfig(kind="ddpm", out_dir=str(out), time_budget_s=None,
                                        epochs=1, train_limit=3000, val_limit=600,
                                        report_n=400, sample_steps=4, track=False))
    return out, result.metrics


@pytest.fixture(scope="module")
def clean_test_images() -> np.ndarray:
    if not FASHION_MNIST_ROOT.is_dir() and not os.environ.get("CI"):
        pytest.skip("Fashion-MNIST not installed")
    return load_idx_dataset(FASHION_MNIST_ROOT, "test")[0][5000:5064].reshape(-1, 28, 28) / 255.0


def _install(bundle: Path, state: Path) -> LocalModel:
    slots = SlotStore(StateDir(state).slots_dir)
    slots.install("a", bundle, meta={"name": "fashion-ddpm", "version": "1.0.0"})
    slots.activate("a")
    return LocalModel(state)


def test_schedule_inverse_and_the_denoiser_time() -> None:
    t = torch.linspace(0.02, 0.98, 49)
    assert torch.allclose(time_of(alpha_bar(t)), t, atol=1e-4)
    # y = x + sigma n, scaled by sqrt(abar), is the diffusion state where (1-abar)/abar = (2s)^2
    ab = alpha_bar(time_of(torch.tensor([1 / (1 + 0.4 ** 2)])))
    assert float((1 - ab) / ab) == pytest.approx(0.16, rel=1e-3)
    # An untrained denoiser still returns images in range, one per input, any batch size.
    with torch.inference_mode():
        out = DenoiseGraph(TinyUNet(num_classes=10)).eval()(torch.rand(3, 1, 28, 28),
                                                            torch.full((3,), 0.2))
    assert out.shape == (3, 1, 28, 28) and 0 <= float(out.min()) <= float(out.max()) <= 1


def test_denoiser_maps_pixel_sigma_to_the_right_diffusion_time() -> None:
    """With a network that knows the noise, the one-step estimate is exact only if sigma in
    pixel units becomes 2 sigma in the network's [-1, 1] units."""

    class KnowsTheNoise(torch.nn.Module):
        def __init__(self, noise: torch.Tensor) -> None:
            super().__init__()
            self.noise = noise

        def forward(self, x, t, label):
            return self.noise

    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 1, 28, 28, generator=gen) * 0.8 + 0.1
    n = torch.randn(4, 1, 28, 28, generator=gen)
    for sigma in (0.05, 0.2, 0.5):
        sig = torch.full((4,), sigma)
        with torch.inference_mode():
            est = DenoiseGraph(KnowsTheNoise(n))(clean + sigma * n, sig)
        torch.testing.assert_close(est, clean, atol=1e-5, rtol=0)


def test_training_exports_the_best_epoch_not_the_last(tmp_path: Path, monkeypatch) -> None:
    if not FASHION_MNIST_ROOT.is_dir() and not os.environ.get("CI"):
        pytest.skip("Fashion-MNIST not installed")
    from safetensors.torch import load_file

    from edgewise.ml.gen import _train

    losses = iter([1.0, 2.0])  # epoch 1 is the best
    seen = []

    def fake_val_loss(self, x, y):
        seen.append({k: v.clone() for k, v in self.ema.state_dict().items()})
        return {"loss": next(losses)}

    monkeypatch.setattr(_train._Family, "val_loss", fake_val_loss)
    result = train_generative(GenConfig(kind="ddpm", out_dir=str(tmp_path), time_budget_s=None,
                                        epochs=2, train_limit=256, val_limit=200, report_n=80,
                                        sample_steps=2, track=False))
    assert result.metrics["best_epoch"] == 1 and result.metrics["val_loss"] == 1.0
    exported = load_file(str(tmp_path / "run" / "unet-ema.safetensors"))
    first, last = seen
    assert any(not torch.equal(first[k], last[k]) for k in first)  # epoch 2 did change it
    for k, v in exported.items():
        torch.testing.assert_close(v, first[k])


@needs_data
def test_ddpm_bundle_validates_and_passes_health_check(ddpm) -> None:
    out, metrics = ddpm
    manifest = validate_bundle(out / "bundle")
    assert manifest.kind == "generator" and manifest.detector is not None
    gen = manifest.generator
    assert gen is not None and gen.conditional and gen.latent_dim == 28 * 28
    assert (gen.model, gen.denoiser) == ("sampler.onnx", "denoiser.onnx")
    assert manifest.metrics["score_method"] in ("fine", "coarse", "combined")
    assert manifest.provenance["sampler"] == "DDIM, 4 steps"
    assert metrics["test_auroc"]["noise"] > 0.9  # uniform noise is nothing like clothing
    assert 1 <= metrics["best_epoch"] <= metrics["epochs"]
    assert (out / "run" / "best.safetensors").is_file()
    report = health_check(out / "bundle")
    assert report.passed, report.reason
    card = (out / "bundle" / "MODEL_CARD.md").read_text()
    assert "DDPM" in card and "denoising" in card


@needs_data
def test_denoiser_raises_psnr_on_device(ddpm, clean_test_images) -> None:
    out, metrics = ddpm
    assert metrics["denoise_psnr_gain_db"] > 2.0
    manifest = validate_bundle(out / "bundle")
    rng = np.random.default_rng(7)
    clean = clean_test_images.astype(np.float32)
    noisy = clean + 0.2 * rng.standard_normal(clean.shape).astype(np.float32)
    est, ms = denoise_images(out / "bundle", manifest, noisy, sigma=0.2)
    assert est.shape == clean.shape and ms > 0
    gain = float(psnr(clean, est).mean() - psnr(clean, noisy).mean())
    assert gain > 2.0, gain
    # The noise level matters: telling the denoiser the noise is 10x weaker removes less.
    weak, _ = denoise_images(out / "bundle", manifest, noisy, sigma=0.02)
    assert float(psnr(clean, weak).mean()) < float(psnr(clean, est).mean())


@needs_data
def test_agent_denoise_and_generate_commands(ddpm, clean_test_images, tmp_path: Path) -> None:
    out, _ = ddpm
    state = tmp_path / "state"
    _install(out / "bundle", state)
    noisy_png = tmp_path / "noisy.png"
    rng = np.random.default_rng(3)
    noisy = np.clip(clean_test_images[0] + 0.2 * rng.standard_normal((28, 28)), 0, 1)
    Image.fromarray((noisy * 255).astype(np.uint8), "L").save(noisy_png)
    result = subprocess.run(edgewise_command("agent", "denoise", str(noisy_png), "--state",
                                             str(state), "--out", str(tmp_path / "den")),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "den" / "noisy.png") as img:
        assert img.size == (28, 28)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = subprocess.run(edgewise_command("agent", "denoise", str(broken), "--state", str(state),
                                          "--out", str(tmp_path / "den2")),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not a readable image" in bad.stdout + bad.stderr
    assert not (tmp_path / "den2").exists()  # nothing written
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(big)
    again = [str(big)]
    for inputs, message in ((again, "the denoiser takes 28x28"),
                            ([str(noisy_png)], "already exist")):
        bad = subprocess.run(edgewise_command("agent", "denoise", *inputs, "--state", str(state),
                                              "--out", str(tmp_path / "den")),
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and message in bad.stdout + bad.stderr
    assert sorted(p.name for p in (tmp_path / "den").iterdir()) == ["noisy.png"]

    grid = tmp_path / "grid.png"
    gen = subprocess.run(edgewise_command("agent", "generate", "--state", str(state), "--class",
                                          "Trouser", "-n", "4", "--out", str(grid)),
                         capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout.strip().splitlines()[-1])["latency_ms"] > 0
    assert grid.is_file()


@needs_data
def test_sampler_is_deterministic_and_follows_the_class(ddpm) -> None:
    out, _ = ddpm
    manifest = validate_bundle(out / "bundle")
    a, _ = generate_images(out / "bundle", manifest, label="Trouser", n=6, seed=1)
    b, _ = generate_images(out / "bundle", manifest, label="Trouser", n=6, seed=1)
    c, _ = generate_images(out / "bundle", manifest, label="Sandal", n=6, seed=1)
    assert a.shape == (6, 28, 28) and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01  # same noise, other class: other images


@needs_data
def test_gen_augment_samples_the_ddpm(ddpm, tmp_path: Path) -> None:
    out, _ = ddpm
    written = synthesize(out / "bundle", label="Bag", n=3, out_dir=tmp_path / "syn")
    assert [p.parent.name for p in written] == ["Bag"] * 3


def test_classifier_bundle_has_no_denoiser(tmp_path: Path) -> None:
    from edgewise.agent import NoModelError
    from tests.conftest import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "tiny")
    with pytest.raises(NoModelError, match="no denoiser"):
        denoise_images(bundle, validate_bundle(bundle), np.zeros((1, 28, 28)), sigma=0.2)


@needs_data
def test_denoiser_path_is_checked_and_optional(ddpm) -> None:
    out, _ = ddpm
    text = (out / "bundle" / "edgewise.json").read_text()
    raw = json.loads(text)
    raw["generator"]["denoiser"] = "../../etc/passwd"
    with pytest.raises(BundleError, match="not allowed"):
        parse_manifest(json.dumps(raw))
    raw["generator"]["denoiser"] = "missing.onnx"
    with pytest.raises(BundleError, match="not listed"):
        parse_manifest(json.dumps(raw))
    del raw["generator"]["denoiser"]
    manifest = parse_manifest(json.dumps(raw))
    assert manifest.generator.denoiser is None
    # Written without the key: readable by agents that predate denoisers.
    assert "denoiser" not in json.loads(manifest.to_json())["generator"]


def test_gen_train_refuses_an_unknown_kind() -> None:
    result = subprocess.run(edgewise_command("gen", "train", "--kind", "gan", "--out", "/tmp/x"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "vae, cvae, ddpm" in result.stdout + result.stderr


def test_interrupted_gen_training_resumes_from_its_last_epoch(tmp_path: Path,
                                                              monkeypatch) -> None:
    if not FASHION_MNIST_ROOT.is_dir() and not os.environ.get("CI"):
        pytest.skip("Fashion-MNIST not installed")
    from edgewise.ml import MLError
    from edgewise.ml.gen import _train

    cfg = GenConfig(kind="vae", out_dir=str(tmp_path), time_budget_s=None, epochs=2,
                    train_limit=512, val_limit=200, report_n=80, track=False)
    real = _train._Family.val_loss
    calls = []

    def power_cut_in_epoch_two(self, x, y):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run dies before epoch 2 is recorded
        return real(self, x, y)

    monkeypatch.setattr(_train._Family, "val_loss", power_cut_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_generative(cfg)
    last = tmp_path / "run" / _train.LAST_CHECKPOINT
    assert last.is_file()
    monkeypatch.setattr(_train._Family, "val_loss", real)

    with pytest.raises(MLError, match="other settings.*latent_dim"):
        train_generative(GenConfig(**{**cfg.__dict__, "latent_dim": 8, "resume": True}))
    said: list[str] = []
    result = train_generative(GenConfig(**{**cfg.__dict__, "resume": True}),
                              notify=said.append)
    assert any("resuming after epoch 1" in m for m in said)
    assert result.metrics["epochs"] == 2 and result.metrics["train_steps"] == 2 * 4
    assert not last.exists()  # complete: a rerun starts afresh
    with pytest.raises(MLError, match="nothing to resume"):
        train_generative(GenConfig(**{**cfg.__dict__, "resume": True}))
