"""A tiny deterministic object detector, exported for real: it finds saturated red, green and
blue squares. Its maps are computed from the pixels (no training), and its decoding and NMS are
the CenterNet detector's own, exported by `export_detector_onnx`, so the agent runs a real
ONNX graph of the shipped contract in a few kilobytes.

`broken="shift"` moves every box by 20 px, `broken="zero"` finds nothing: both ship under the
healthy version's golden set, as a bad build would.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from edgewise.artifacts import load_golden, read_manifest, write_bundle
from edgewise.ml.backbones import get_backbone_spec
from edgewise.ml.detect import DetectionDataset, write_detector_bundle
from edgewise.ml.detect._model import STRIDE, CenterNetDetector, export_detector_onnx
from edgewise.ml.detect._train import detector_contract

CLASSES = ("red", "green", "blue")
SIZE = 64
SQUARE = 24  # px: 3 cells of the stride-8 map


class BlobDetector(nn.Module):
    def __init__(self, *, broken: str | None = None) -> None:
        super().__init__()
        self.spec = get_backbone_spec("efficientnet-lite0")
        self.num_classes, self.input_size = len(CLASSES), (SIZE, SIZE)
        self.max_detections, self.score_threshold, self.nms_iou = 10, 0.05, 0.6
        self.broken = broken
        shift = 2.5 if broken == "shift" else 0.0  # cells: 20 px
        side = math.log(SQUARE / STRIDE)
        self.register_buffer("box_const", torch.tensor([0.5 + shift, 0.5, side, side]
                                                       ).view(1, 4, 1, 1))
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor):
        rgb = x * self.std + self.mean
        # colour purity: a channel above the mean of the other two (white and black score 0)
        purity = rgb - (rgb.sum(1, keepdim=True) - rgb) / 2
        cells = F.avg_pool2d(purity, STRIDE)
        heat = 12 * (F.avg_pool2d(cells, 3, stride=1, padding=1) - 0.6)
        if self.broken == "zero":
            heat = heat * 0 - 20
        box = self.box_const.expand(x.shape[0], 4, *heat.shape[-2:])
        return CenterNetDetector.decode(self, heat, box)


class ConvBlobDetector(nn.Module):
    """`BlobDetector` written as convolutions (colour purity a 1x1 conv on the normalised
    input, the cell and 3x3 averages depthwise convs, the heat scale a 1x1 conv), so that
    `edgewise compress` has a network to quantize in front of the same decoding and NMS."""

    def __init__(self) -> None:
        super().__init__()
        self.spec = get_backbone_spec("efficientnet-lite0")
        self.num_classes, self.input_size = len(CLASSES), (SIZE, SIZE)
        self.max_detections, self.score_threshold, self.nms_iou = 10, 0.05, 0.6
        mean, std = torch.tensor(self.spec.mean), torch.tensor(self.spec.std)
        mix = 1.5 * torch.eye(3) - 0.5  # purity_c = rgb_c - mean of the other two
        self.purity = nn.Conv2d(3, 3, 1)
        self.cells = nn.Conv2d(3, 3, STRIDE, stride=STRIDE, groups=3, bias=False)
        self.around = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
        self.heat = nn.Conv2d(3, 3, 1)
        self.box = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.purity.weight.copy_((mix * std[None, :]).view(3, 3, 1, 1))
            self.purity.bias.copy_(mix @ mean)
            self.cells.weight.fill_(1 / STRIDE ** 2)
            self.around.weight.fill_(1 / 9)
            self.heat.weight.copy_(12 * torch.eye(3).view(3, 3, 1, 1))
            self.heat.bias.fill_(-12 * 0.6)
            self.box.weight.zero_()
            side = math.log(SQUARE / STRIDE)
            self.box.bias.copy_(torch.tensor([0.5, 0.5, side, side]))

    def forward(self, x: torch.Tensor):
        p = self.around(self.cells(self.purity(x)))
        return CenterNetDetector.decode(self, self.heat(p), self.box(p))


def square_scenes(n: int, seed: int = 0) -> DetectionDataset:
    """n scenes of 1-2 non-overlapping squares on the stride grid, with their exact boxes
    (what the blob detectors find exactly)."""
    rng = np.random.default_rng(seed)
    images, boxes, labels = [], [], []
    for _ in range(n):
        squares: list[tuple[str, int, int]] = []
        while len(squares) < int(rng.integers(1, 3)):
            x, y = (int(v) * STRIDE for v in rng.integers(0, (SIZE - SQUARE) // STRIDE + 1, 2))
            if all(abs(x - a) >= SQUARE or abs(y - b) >= SQUARE for _, a, b in squares):
                squares.append((CLASSES[int(rng.integers(0, 3))], x, y))
        images.append(scene(squares))
        boxes.append(np.array([[x, y, x + SQUARE, y + SQUARE] for _, x, y in squares],
                              np.float32))
        labels.append(np.array([CLASSES.index(c) for c, _, _ in squares], np.int64))
    return DetectionDataset(tuple(images), tuple(boxes), tuple(labels), CLASSES,
                            tuple(f"{i:03d}.png" for i in range(n)), "squares")


def scene(squares: list[tuple[str, int, int]], size: int = SIZE) -> np.ndarray:
    """A dark scene (uint8 RGB) with a SQUARE-sized (scaled with `size`) square of each
    (colour, x, y), x and y at the input size."""
    k = size / SIZE
    image = np.full((size, size, 3), 30, np.uint8)
    for colour, x, y in squares:
        c = CLASSES.index(colour)
        px = np.full(3, 30, np.uint8)
        px[c] = 250
        image[round(y * k):round((y + SQUARE) * k), round(x * k):round((x + SQUARE) * k)] = px
    return image


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


SCENES = [[("red", 8, 8), ("green", 32, 32)], [("blue", 16, 24)],
          [("green", 0, 40), ("red", 40, 0), ("blue", 24, 16)], []]


def make_detector_bundle(out: Path, *, version: str = "1.0.0", broken: str | None = None,
                         name: str = "blobs", conv: bool = False) -> Path:
    """A signed-ready detector bundle; a broken one ships its faulty graph with the healthy
    graph's golden set; `conv`: the `ConvBlobDetector` (something to compress)."""
    work = out.parent / f".{out.name}-work"
    work.mkdir(parents=True)
    good = (ConvBlobDetector() if conv else BlobDetector()).eval()
    export_detector_onnx(good, work / "good.onnx")
    contract = detector_contract(good, CLASSES)
    target = work / "good" if broken else out
    write_detector_bundle(target, model=work / "good.onnx", contract=contract,
                          images=[scene(s) for s in SCENES], name=name, version=version)
    if broken is None:
        return out
    export_detector_onnx(BlobDetector(broken=broken).eval(), work / "broken.onnx")
    manifest = read_manifest(target)
    golden = load_golden(target, manifest)
    extra = {rel: target / rel for rel in manifest.files
             if rel not in (manifest.model, manifest.golden.file)}
    write_bundle(out, name=name, version=version, labels=manifest.labels,
                 preprocessing=manifest.preprocessing, model=work / "broken.onnx",
                 golden_inputs=golden.inputs, golden_outputs=golden.outputs,
                 atol=manifest.golden.atol, max_latency_ms=manifest.golden.max_latency_ms,
                 extra_files=extra, metrics=manifest.metrics, kind=manifest.kind,
                 detection=manifest.detection)
    assert json.loads((out / "detector.json").read_text())["class_names"] == list(CLASSES)
    return out
