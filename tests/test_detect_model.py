"""The CenterNet detector: decoding and NMS, the ONNX contract (onnxruntime gives torch's
boxes), and a few real training steps on synthetic scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgewise.ml import MLError
from edgewise.ml.detect import SynthConfig, detection_split, evaluate_detections, synth_scenes
from edgewise.ml.detect._model import (
    STRIDE,
    CenterNetDetector,
    _fast_nms,
    export_detector_onnx,
    onnx_detect,
)
from edgewise.ml.detect._train import DetectConfig, predict, resize_dataset, train_detector


def test_fast_nms() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]],
                         dtype=torch.float32)
    labels = torch.tensor([0, 0, 1, 0])
    # Box 1 overlaps the higher-ranked box 0 of its class (IoU 0.81); box 2 is another class.
    assert _fast_nms(boxes, labels, 0.6).tolist() == [False, True, False, False]
    assert _fast_nms(boxes, labels, 0.9).tolist() == [False, False, False, False]


def test_decode_known_peaks() -> None:
    model = CenterNetDetector(3, input_size=(64, 64), pretrained=False, max_detections=5,
                              score_threshold=0.5).eval()
    g = 64 // STRIDE
    heat = torch.full((1, 3, g, g), -10.0)
    box = torch.zeros(1, 4, g, g)
    heat[0, 2, 3, 4] = 3.0  # class 2 centred in cell (x=4, y=3)
    box[0, :, 3, 4] = torch.tensor([0.5, 0.25, np.log(2.0), np.log(1.0)])
    heat[0, 0, 6, 1] = 0.0  # sigmoid 0.5: not above the threshold
    boxes, scores, labels = model.decode(heat, box)
    assert labels.tolist() == [2] and labels.dtype == torch.int64
    cx, cy = (4 + 0.5) * STRIDE, (3 + 0.25) * STRIDE
    expected = [cx - STRIDE, cy - STRIDE / 2, cx + STRIDE, cy + STRIDE / 2]
    np.testing.assert_allclose(boxes[0].numpy(), expected, atol=1e-5)
    assert scores[0].item() == pytest.approx(torch.tensor(3.0).sigmoid().item())


@pytest.mark.slow
def test_onnx_contract_matches_torch(tmp_path: Path) -> None:
    import onnx

    torch.manual_seed(0)
    model = CenterNetDetector(10, input_size=(96, 96), pretrained=True, max_detections=20,
                              score_threshold=0.0).eval()
    path = export_detector_onnx(model, tmp_path / "det.onnx")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image"]
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 96, 96]
    assert [o.name for o in graph.output] == ["boxes", "scores", "labels"]
    assert graph.output[2].type.tensor_type.elem_type == onnx.TensorProto.INT64
    ops = {n.op_type for n in graph.node}
    assert {"MaxPool", "TopK"} <= ops  # decoding is in the graph
    # EfficientNet's "same" padding is folded into the convolutions (17 Pad nodes were half
    # the CPU time), asymmetric ones included; the outputs below stay torch's.
    assert "Pad" not in ops
    assert any(list(a.ints) == [0, 0, 1, 1] for n in graph.node if n.op_type == "Conv"
               for a in n.attribute if a.name == "pads")
    for seed in range(3):
        x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            tb, ts, tl = (t.numpy() for t in model(x))
        ob, os_, ol = onnx_detect(path, x.numpy())
        assert ob.dtype == np.float32 and ol.dtype == np.int64 and ob.shape[1] == 4
        assert 0 < len(ob) <= 20 and ob.shape == tb.shape
        np.testing.assert_array_equal(ol, tl)
        np.testing.assert_allclose(ob, tb, atol=1e-3)
        np.testing.assert_allclose(os_, ts, atol=1e-5)
        assert (np.diff(os_) <= 0).all()  # sorted by score


def test_train_refuses_bad_config(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    ds = synth_scenes(SynthConfig(scenes=4, size_px=64, min_object_frac=0.2))
    with pytest.raises(MLError, match="not empty"):
        train_detector(DetectConfig(data="", out_dir=str(tmp_path / "out")), dataset=ds)
    with pytest.raises(MLError, match="multiple of 32"):
        train_detector(DetectConfig(data="", out_dir=str(tmp_path / "new"), input_size=100),
                       dataset=ds)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_few_steps_learn_and_export(tmp_path: Path) -> None:
    ds = synth_scenes(SynthConfig(scenes=48, size_px=96, seed=1))
    cfg = DetectConfig(data="", out_dir=str(tmp_path / "run"), input_size=96, max_steps=40,
                       batch_size=8, time_budget_s=600, val_every_s=1e9)
    result = train_detector(cfg, dataset=ds)
    m = result.metrics
    assert m["steps"] == 40 and m["onnx_box_parity_px"] <= 0.05
    for name in ("best.pt", "model.onnx", "metrics.json", "config.json", "detector.json"):
        assert (tmp_path / "run" / name).is_file()
    contract = json.loads((tmp_path / "run" / "detector.json").read_text())
    assert contract["class_names"] == list(ds.class_names)
    assert contract["input"]["shape"] == [1, 3, 96, 96]
    assert contract["input"]["mean"] == pytest.approx([127 / 255] * 3)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_steps"] == 40
    # Transfer learning: the stride <= 8 blocks keep their ImageNet weights, later ones moved.
    imagenet = CenterNetDetector(10, input_size=(96, 96))
    trained = result.model
    assert torch.equal(trained.stem.weight, imagenet.stem.weight)
    assert torch.equal(trained.blocks[4]._project_conv.weight,
                       imagenet.blocks[4]._project_conv.weight)
    assert torch.equal(trained.blocks[4]._bn2.running_mean, imagenet.blocks[4]._bn2.running_mean)
    assert not torch.equal(trained.blocks[12]._project_conv.weight,
                           imagenet.blocks[12]._project_conv.weight)
    # The same validation images through an untrained head score (about) nothing.
    torch.manual_seed(0)
    untrained = CenterNetDetector(10, input_size=(96, 96), score_threshold=0.05)
    full = resize_dataset(ds, 96)
    val = full.subset(detection_split(full, cfg.val_fraction, cfg.seed)[1])
    before = evaluate_detections(val, predict(untrained, val))["map50"]
    assert m["val_map50"] > before + 0.05, (before, m["val_map50"])


@pytest.mark.slow
def test_from_scratch_trains_everything(tmp_path: Path) -> None:
    ds = synth_scenes(SynthConfig(scenes=12, size_px=64, min_object_frac=0.2, seed=2))
    cfg = DetectConfig(data="", out_dir=str(tmp_path / "run"), input_size=64, max_steps=4,
                       batch_size=4, pretrained=False, val_every_s=1e9, time_budget_s=600)
    model = train_detector(cfg, dataset=ds).model
    torch.manual_seed(cfg.seed)
    start = CenterNetDetector(10, input_size=(64, 64), pretrained=False)
    assert not torch.equal(model.stem.weight, start.stem.weight)  # nothing frozen
    assert model.stem_bn.momentum == 0.1
