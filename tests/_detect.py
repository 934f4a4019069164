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
from edgewise.ml.detect import write_detector_bundle
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
                         name: str = "blobs") -> Path:
    """A signed-ready detector bundle; a broken one ships its faulty graph with the healthy
    graph's golden set."""
    work = out.parent / f".{out.name}-work"
    work.mkdir(parents=True)
    good = BlobDetector().eval()
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
