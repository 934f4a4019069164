"""`edgewise train` end to end on a tiny real image folder: data errors, strategy choice,
augmentation, resume, ONNX/torch agreement, the bundle, MLflow, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgewise.artifacts import validate_bundle
from edgewise.ml import DatasetError, MLError
from edgewise.ml.augment import AUGMENT_PRESETS, AugmentConfig, augment_batch
from edgewise.ml.compress import load_torch_model
from edgewise.ml.data import (
    class_balance_warnings,
    load_dataset,
    load_image_folder,
    stratified_split,
)
from edgewise.ml.evaluate import evaluate_bundle
from edgewise.ml.strategies import choose_strategy
from edgewise.ml.train import TrainConfig, parse_duration, train

CLASSES = ("bars", "columns", "dots")


def _pattern(cls: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    img = rng.integers(0, 60, (size, size)).astype(np.uint8)
    k = int(rng.integers(0, 4))
    if cls == 0:
        img[k::4, :] = 230
    elif cls == 1:
        img[:, k::4] = 230
    else:
        img[k::4, k::4] = 250
    return img


def make_folder(root: Path, per_class: int = 24, *, seed: int = 0,
                counts: dict[str, int] | None = None) -> Path:
    rng = np.random.default_rng(seed)
    for cls, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range((counts or {}).get(name, per_class)):
            Image.fromarray(_pattern(cls, rng)).save(d / f"{i:03d}.png")
    return root


FAST = {"strategy": "from-scratch", "backbone": "small-cnn", "batch_size": 16,
        "augment": "light", "track": False, "bf16": False, "threads": 1}


# ---- data --------------------------------------------------------------------------------

def test_image_folder_loads_classes_in_order(tmp_path: Path) -> None:
    ds = load_image_folder(make_folder(tmp_path / "d", per_class=5))
    assert ds.class_names == CLASSES
    assert ds.images.shape == (15, 16, 16) and ds.channels == 1
    assert np.bincount(ds.labels).tolist() == [5, 5, 5]


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=3)
    (root / "dots" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match=r"bad\.png: corrupt"):
        load_image_folder(root)


def test_empty_class_is_an_error(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", per_class=3)
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty class"):
        load_dataset(str(root))


def test_mismatched_idx_label_file(tmp_path: Path) -> None:
    def idx(path: Path, magic: int, shape: tuple[int, ...]) -> None:
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
        path.write_bytes(header + bytes(int(np.prod(shape))))

    for prefix in ("train", "t10k"):
        idx(tmp_path / f"{prefix}-images-idx3-ubyte", 0x803, (5, 28, 28))
        idx(tmp_path / f"{prefix}-labels-idx1-ubyte", 0x801, (4,))
    with pytest.raises(DatasetError, match="5 images but 4 labels"):
        load_dataset(str(tmp_path))


def test_imbalance_warning_and_stratified_split(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", counts={"bars": 30, "columns": 30, "dots": 6})
    ds = load_image_folder(root)
    warnings = class_balance_warnings(ds)
    assert any("'dots' (6)" in w for w in warnings)
    train_idx, val_idx = stratified_split(ds.labels, 0.2, seed=0)
    assert not set(train_idx) & set(val_idx)
    assert np.bincount(ds.labels[val_idx]).tolist() == [6, 6, 1]


def test_unknown_dataset_is_clear() -> None:
    with pytest.raises(DatasetError, match="no such directory"):
        load_dataset("/nonexistent/data")


# ---- strategy ----------------------------------------------------------------------------

@pytest.mark.parametrize(("per_class", "channels", "size", "strategy", "case"), [
    (50, 3, (224, 224), "feature-extract", 1),
    (5000, 3, (224, 224), "fine-tune", 2),
    (100, 1, (28, 28), "feature-extract", 3),  # from the middle blocks
    (6000, 1, (28, 28), "from-scratch", 4),  # Fashion-MNIST: large and different
])
def test_auto_applies_the_four_cases(per_class, channels, size, strategy, case) -> None:
    choice = choose_strategy(images_per_class=per_class, channels=channels, image_size=size)
    assert (choice.strategy, choice.case) == (strategy, case)
    assert f"case {case}" in choice.reason and str(per_class) in choice.reason


def test_explicit_strategy_wins_and_unknown_fails() -> None:
    assert choose_strategy(images_per_class=6000, channels=1, image_size=(28, 28),
                           requested="feature-extract").strategy == "feature-extract"
    with pytest.raises(ValueError, match="unknown strategy"):
        choose_strategy(images_per_class=1, channels=1, image_size=(8, 8), requested="magic")


# ---- augmentation --------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(AUGMENT_PRESETS))
def test_augment_keeps_shape_and_range(preset: str) -> None:
    x = torch.rand(8, 3, 20, 20)
    y = augment_batch(x, AugmentConfig.preset(preset), torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    if preset == "none":
        assert y is x
    else:
        assert not torch.equal(y, x)


def test_augment_is_reproducible_and_crop_shifts() -> None:
    x = torch.zeros(4, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    cfg = AugmentConfig(crop_pad_px=2)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.allclose(a.sum(dim=(1, 2, 3)), torch.full((4,), 4.0))  # shifted, not lost


def test_parse_duration() -> None:
    assert parse_duration("15m") == 900 and parse_duration("90") == 90
    assert parse_duration("1h30m") == 5400
    with pytest.raises(ValueError):
        parse_duration("soon")


# ---- training runs -------------------------------------------------------------------------

def test_train_writes_a_bundle_that_eval_scores(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=30)
    result = train(TrainConfig(data=str(data), out_dir=str(tmp_path / "out"), epochs=4,
                               tta_flip=True, **FAST))
    manifest = validate_bundle(tmp_path / "out" / "bundle")
    for name in ("model.onnx", "golden.npz", "MODEL_CARD.md", "learning_curves.png",
                 "confusion_matrix.png", "train_config.json"):
        assert name in manifest.files
    assert manifest.labels == CLASSES
    assert manifest.provenance["strategy"] == "from-scratch"
    assert manifest.metrics["onnx_torch_max_diff"] < 1e-3
    config = json.loads((tmp_path / "out" / "run" / "config.json").read_text())
    assert config["backbone"] == "small-cnn" and config["resolution"] == 16
    # Scored again by `edgewise eval`'s code path, on the held-out split it was tested on.
    scored = evaluate_bundle(tmp_path / "out", str(data))
    assert scored["images"] == 90 and 0.0 <= scored["accuracy"] <= 1.0
    assert result.metrics["test_accuracy"] > 0.6  # three trivially separable patterns
    assert not (tmp_path / "out" / "run" / "checkpoints" / "last.pt").exists()
    assert (tmp_path / "out" / "run" / "checkpoints" / "best.pt").exists()
    # `edgewise compress` can rebuild the model in torch (pruning, distillation): the weights
    # ship beside the ONNX and reproduce the golden outputs.
    assert "weights.safetensors" in manifest.files
    rebuilt = load_torch_model(tmp_path / "out" / "bundle", manifest)
    assert rebuilt.arch == "image-classifier"


def test_resume_continues_exactly_where_it_paused(tmp_path: Path) -> None:
    data = str(make_folder(tmp_path / "data", per_class=20))
    common = {"data": data, "epochs": 3, "ema": True, **FAST}
    straight = train(TrainConfig(out_dir=str(tmp_path / "a"), **common))
    paused = train(TrainConfig(out_dir=str(tmp_path / "b"), stop_after_epochs=1, **common))
    assert paused.paused and len(paused.history) == 1
    assert (tmp_path / "b" / "run" / "checkpoints" / "last.pt").exists()
    with pytest.raises(MLError, match="--resume"):
        train(TrainConfig(out_dir=str(tmp_path / "b"), **common))
    resumed = train(TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **common))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for key in ("train_loss", "val_accuracy"):
        assert resumed.history[-1][key] == pytest.approx(straight.history[-1][key], abs=1e-6)
    with pytest.raises(MLError, match="nothing to resume"):
        train(TrainConfig(out_dir=str(tmp_path / "c"), resume=True, **common))


def test_onnx_and_torch_agree_with_flip_averaging_in_the_graph(tmp_path: Path) -> None:
    import onnxruntime as ort

    from edgewise.ml.backbones import create_backbone
    from edgewise.ml.model import ImageClassifier
    from edgewise.ml.quick import export_onnx

    torch.manual_seed(0)
    bb = create_backbone("fast-cnn", pretrained=False)
    model = ImageClassifier(bb, bb.spec, 10, input_channels=1, input_mean=(0.3,),
                            input_std=(0.35,), input_size=(28, 28), resolution=28,
                            tta_flip=True).eval()
    x = torch.randn(5, 1, 28, 28)
    export_onnx(model, x[:2], tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.inference_mode():
        expected = model(x).numpy()
        plain = model.head(model.features(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert not np.allclose(plain, expected, atol=1e-4)  # the mirror really is in the graph


def test_mlflow_run_holds_metrics_and_artifacts(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    data = str(make_folder(tmp_path / "data", per_class=12))
    result = train(TrainConfig(data=data, out_dir=str(tmp_path / "out"), epochs=2,
                               **{**FAST, "track": True}))
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'run' / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "test_accuracy" in run.data.metrics
    assert [m.step for m in client.get_metric_history(result.run_id, "val_accuracy")] == [1, 2]
    assert run.data.params["chosen_strategy"] == "from-scratch"
    paths = {a.path for a in client.list_artifacts(result.run_id, "bundle")}
    assert "bundle/model.onnx" in paths and "bundle/MODEL_CARD.md" in paths


def test_cli_train_then_eval(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgewise.cli import app

    data = tmp_path / "data"  # with train/ and test/: train and eval score the same split
    make_folder(data / "train", per_class=12)
    make_folder(data / "test", per_class=6, seed=1)
    data = str(data)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data", data, "--out", str(out), "--time-budget",
                                 "30s", "--strategy", "from-scratch", "--backbone", "small-cnn",
                                 "--batch-size", "16", "--no-tracking"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["wall_s"] <= 30
    # On the clock, the first half of the schedule is validated every other epoch only; the
    # second half and the last epoch always are (the shipped weights are the best validated).
    run = json.loads((out / "run" / "summary.json").read_text())
    history = run["history"]
    assert len(history) >= 8
    assert history[0]["val_accuracy"] is None and history[-1]["val_accuracy"] is not None
    assert all(h["val_accuracy"] is not None for h in history if h["epoch"] % 2 == 0)
    assert all(h["val_accuracy"] is not None for h in history[-(len(history) // 4):])
    best = history[run["metrics"]["best_epoch"] - 1]
    assert best["val_accuracy"] == pytest.approx(summary["val_accuracy"], abs=1e-4)
    validate_bundle(out / "bundle")
    scored = runner.invoke(app, ["eval", str(out / "bundle"), "--data", data])
    assert scored.exit_code == 0, scored.output
    line = json.loads(scored.stdout.strip().splitlines()[-1])
    assert line["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)
    bad = runner.invoke(app, ["train", "--data", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "o2")])
    assert bad.exit_code == 1 and "no such directory" in bad.output


def test_from_scratch_backbone_rebuilds_for_rgb_but_pretrained_does_not() -> None:
    from edgewise.ml import BackboneError
    from edgewise.ml.backbones import create_backbone

    bb = create_backbone("fast-cnn", pretrained=False, in_channels=3)
    assert bb.spec.in_channels == 3 and len(bb.spec.mean) == 3
    assert bb(torch.rand(2, 3, 28, 28)).shape == (2, 256)
    with pytest.raises(BackboneError, match="in_channels"):
        create_backbone("efficientnet-lite0", in_channels=1)


def test_fine_tune_trains_last_blocks_on_cached_activations(tmp_path: Path) -> None:
    data = str(make_folder(tmp_path / "data", per_class=10))
    messages: list[str] = []
    result = train(TrainConfig(data=data, out_dir=str(tmp_path / "out"), strategy="fine-tune",
                               trainable_blocks=2, resolution=32, epochs=2, batch_size=8,
                               augment="none", track=False, threads=1),
                   notify=messages.append)
    assert any("cached frozen activations" in m for m in messages)
    manifest = validate_bundle(tmp_path / "out" / "bundle")
    assert manifest.provenance["backbone"] == "efficientnet-lite0"
    assert manifest.provenance["backbone_weights_sha256"]
    assert manifest.metrics["onnx_torch_max_diff"] < 1e-2
    assert len(result.history) == 2
    assert load_torch_model(tmp_path / "out" / "bundle", manifest).arch == "image-classifier"


def test_auto_on_small_unlike_imagenet_data_uses_the_middle_blocks(tmp_path: Path) -> None:
    """Case 3: a linear head on the frozen middle blocks' activation map, exported whole."""
    from edgewise.ml.backbones import create_backbone

    data = str(make_folder(tmp_path / "data", per_class=10))
    messages: list[str] = []
    result = train(TrainConfig(data=data, out_dir=str(tmp_path / "out"), resolution=64,
                               track=False, threads=1), notify=messages.append)
    assert (result.choice.strategy, result.choice.case) == ("feature-extract", 3)
    assert any("first 8 blocks pooled to 4x4" in m for m in messages)
    config = json.loads((tmp_path / "out" / "run" / "config.json").read_text())
    assert config["feature_blocks"] == 8
    manifest = validate_bundle(tmp_path / "out" / "bundle")
    assert manifest.metrics["onnx_torch_max_diff"] < 1e-3
    rebuilt = load_torch_model(tmp_path / "out" / "bundle", manifest).module
    assert rebuilt.head.in_features == 80 * 4 * 4  # stage 4's 80 channels on a 4x4 grid
    assert len(rebuilt.backbone._blocks) == 8
    # The trunk is the pretrained network's, untouched (frozen): same weights, same outputs.
    full = create_backbone("efficientnet-lite0")
    trunk = full.trunk(8, 4)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt.backbone(x), trunk(x))
    assert trunk(x).shape == (2, 1280) and result.metrics["test_accuracy"] > 0.6
    with pytest.raises(MLError, match="feature-extract strategy"):
        train(TrainConfig(data=data, out_dir=str(tmp_path / "o2"), strategy="fine-tune",
                          feature_blocks=8, track=False, threads=1))


def test_feature_extract_embeds_what_the_time_budget_allows() -> None:
    """Embedding dominates feature extraction: under a budget, a stratified subset of the
    training images is embedded (the rest of the run keeps its reserve), never a silent
    overrun."""
    import time as _time

    import torch

    from edgewise.ml.errors import MLError
    from edgewise.ml.train import _budgeted_subset

    class SlowBackbone:
        def features(self, x):  # 1 ms per image
            _time.sleep(0.001 * len(x))
            return x

    labels = torch.tensor([0] * 6000 + [1] * 3000 + [2] * 1000)
    images = torch.zeros((len(labels), 1, 2, 2), dtype=torch.uint8)
    said: list[str] = []

    def run(budget_s: float):
        cfg = TrainConfig(data="x", out_dir="y", time_budget_s=budget_s, seed=1)
        return _budgeted_subset(cfg, SlowBackbone(), lambda u8: u8, images, labels, 0, 0, 3,
                                _time.perf_counter(), said.append)

    x, y = run(29.0)  # ~4 s of embedding left after the 25 s reserve: ~4000 of 10000
    assert 1000 < len(y) < 5000 and len(x) == len(y)
    counts = torch.bincount(y, minlength=3).tolist()
    assert abs(counts[0] / len(y) - 0.6) < 0.02 and abs(counts[2] / len(y) - 0.1) < 0.02
    assert said and f"of {len(labels)} training images" in said[-1]
    x, y = run(3600.0)  # everything fits
    assert len(y) == len(labels)
    with pytest.raises(MLError, match="no time to embed"):
        run(25.0)


def test_balance_auto_measures_the_fixes_and_says_which_it_chose(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "d", counts={"bars": 60, "columns": 60, "dots": 8})
    said: list[str] = []
    train(TrainConfig(data=str(data), out_dir=str(tmp_path / "out"), epochs=3,
                      balance="auto", **FAST), notify=said.append)
    config = json.loads((tmp_path / "out" / "run" / "config.json").read_text())
    choice = config["balance_choice"]
    assert set(choice["trials"]) == {"none", "weights", "oversample"}
    assert choice["trials"][choice["option"]] == max(choice["trials"].values())  # ties: any
    assert config["balance"] == choice["option"]  # the final run trained with it
    assert "balanced validation accuracy" in choice["reason"]
    manifest = validate_bundle(tmp_path / "out" / "bundle")
    assert manifest.provenance["balance"] == choice["option"]
    assert "class balance" in (tmp_path / "out" / "bundle" / "MODEL_CARD.md").read_text()
    assert any("class balance:" in m for m in said)


def test_balance_options_and_errors(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "d", counts={"bars": 40, "columns": 40, "dots": 30})
    auto = train(TrainConfig(data=str(data), out_dir=str(tmp_path / "a"), epochs=1,
                             balance="auto", **FAST))
    assert auto.manifest.provenance["balance"] == "none"  # 40/30: balanced enough, no trials
    for option in ("weights", "oversample"):
        result = train(TrainConfig(data=str(data), out_dir=str(tmp_path / option), epochs=1,
                                   balance=option, **FAST))
        assert result.manifest.provenance["balance"] == option
    with pytest.raises(MLError, match="unknown --balance"):
        train(TrainConfig(data=str(data), out_dir=str(tmp_path / "x"), balance="smote",
                          **FAST))
    with pytest.raises(MLError, match="needs --generator"):
        train(TrainConfig(data=str(data), out_dir=str(tmp_path / "y"), balance="generative",
                          **FAST))


def test_idx_split_written_locally_reads_back(tmp_path: Path) -> None:
    from edgewise.ml.data import load_idx_dataset, write_idx_dataset

    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 2])
    write_idx_dataset(tmp_path, "train", images, labels)
    write_idx_dataset(tmp_path, "test", images[:3], labels[:3])
    x, y = load_idx_dataset(tmp_path, "train", num_classes=3)
    assert np.array_equal(x, images) and y.tolist() == labels.tolist()
    with pytest.raises(DatasetError, match="one label each"):
        write_idx_dataset(tmp_path, "train", images, labels[:3])


def test_class_weights_are_gentle_and_average_one() -> None:
    import torch

    from edgewise.ml.train import class_weights

    counts = torch.tensor([6000, 60, 6000, 600])
    w = class_weights(counts)
    assert float((w * counts).sum() / counts.sum()) == pytest.approx(1.0)
    assert float(w[1] / w[0]) == pytest.approx(10.0)  # sqrt(100), not 100
    assert float(w[3] / w[0]) == pytest.approx(10 ** 0.5)
    assert torch.isfinite(class_weights(torch.tensor([5, 0, 5]))).all()  # empty class


@pytest.mark.slow
def test_balance_auto_trials_keep_to_their_share_of_the_time_budget(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """The trials together stay within their share of --time-budget, their overhead (here a
    slow validation pass) included, so the final run still gets most of the time."""
    import time as _time

    from edgewise.ml import train as train_module

    judge = train_module.balanced_accuracy

    def slow_judge(*args, **kwargs):
        _time.sleep(4.0)
        return judge(*args, **kwargs)

    monkeypatch.setattr(train_module, "balanced_accuracy", slow_judge)

    data = make_folder(tmp_path / "d", counts={"bars": 150, "columns": 150, "dots": 8})
    stamps: list[tuple[float, str]] = []
    budget = 60.0
    result = train(TrainConfig(data=str(data), out_dir=str(tmp_path / "out"),
                               time_budget_s=budget, balance="auto", **FAST),
                   notify=lambda m: stamps.append((_time.perf_counter(), m)))
    first = next(t for t, m in stamps if m.startswith("class balance trial"))
    chosen = next(t for t, m in stamps if m.startswith("class balance:"))
    assert chosen - first <= budget * train_module._TRIAL_SHARE + 3.0
    assert result.metrics["epochs"] >= 2


def test_rare_class_synthesis_fits_in_its_share_of_the_time_budget(monkeypatch) -> None:
    """A slow generator (a diffusion sampler: ~25 ms an image) gets a share of the budget,
    not the whole run: fewer images, and the user is told."""
    import time as _time

    import torch

    from edgewise.ml.gen import _augment
    from edgewise.ml.train import _SYNTHESIS_SHARE, _with_synthesis

    def slow_sampler(bundle, *, label, n, seed=0, batch=256):
        _time.sleep(0.01 * n)
        return np.zeros((n, 1, 4, 4), np.uint8)

    monkeypatch.setattr(_augment, "sample_images", slow_sampler)
    y = torch.tensor([0] * 500 + [1] * 500 + [2] * 10)
    x = torch.zeros((len(y), 1, 4, 4), dtype=torch.uint8)
    said: list[str] = []
    cfg = TrainConfig(data="x", out_dir="y", time_budget_s=10.0, generator="g")
    t0 = _time.perf_counter()
    x2, y2 = _with_synthesis(cfg, x, y, ["a", "b", "c"], said.append)
    added = len(y2) - len(y)
    assert len(x2) == len(y2) and set(y2[len(y):].tolist()) == {2}
    assert 100 <= added <= 10.0 * _SYNTHESIS_SHARE / 0.01 + 10  # not the 490 wanted
    assert "of the 490 wanted" in said[-1]
    assert _time.perf_counter() - t0 < 10.0 * _SYNTHESIS_SHARE + 1.5
