"""A CenterNet-style single-stage detector on EfficientNet-Lite0, decoding and NMS in the graph.

Why CenterNet (objects as centre points) rather than SSD or anchor-based YOLO: it has no
anchors to tune for the small, varied objects of an edge camera's frame; it predicts on one
stride-8 map, so its head is two small convolutions; and its decoding is a 3x3 max-pool, a
top-k and a gather, all plain ONNX operators, so the whole post-processing ships inside the
model and any runtime gives the same boxes. A class-aware "fast NMS" (vectorised, as in
YOLACT) then removes the rare duplicate peaks of one object.

Invariant: `CenterNetDetector` takes exactly the tensor the bundle's preprocessing contract
describes (RGB at `input_size`, normalised with the backbone's mean/std, NCHW). In training
mode `forward` returns the raw maps (heatmap logits [B, C, h, w], box [B, 4, h, w]); in eval
mode, for one image, it returns (boxes float32 [N, 4] as x1, y1, x2, y2 in input pixels,
scores float32 [N], labels int64 [N]) with N <= `max_detections`, sorted by score.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import create_backbone, get_backbone_spec
from ..errors import ExportError

__all__ = ["STRIDE", "CenterNetDetector", "export_detector_onnx", "fold_pads", "onnx_detect"]

STRIDE = 8
# Where EfficientNet-Lite0's stages end (index of their last block): stride 8 (40 channels),
# 16 (112) and 32 (320). The 1280-channel head convolution is not used.
_TAPS = ((4, 40), (10, 112), (15, 320))
_OPSET = 17


def _sep_conv(ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1, groups=ch, bias=False),
                         nn.Conv2d(ch, ch, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU())


class CenterNetDetector(nn.Module):
    def __init__(self, num_classes: int, *, input_size: tuple[int, int] = (160, 160),
                 pretrained: bool = True, width: int = 64, max_detections: int = 50,
                 score_threshold: float = 0.3, nms_iou: float = 0.6) -> None:
        super().__init__()
        h, w = input_size
        if h % 32 or w % 32:
            raise ValueError(f"input size must be a multiple of 32, not {h}x{w}")
        if not 1 <= max_detections <= num_classes * (h // STRIDE) * (w // STRIDE):
            raise ValueError(f"max_detections must be 1..{num_classes * (h // 8) * (w // 8)}")
        self.spec = get_backbone_spec("efficientnet-lite0")
        net = create_backbone("efficientnet-lite0", pretrained=pretrained)
        self.stem, self.stem_bn = net._conv_stem, net._bn0
        self.blocks = nn.ModuleList(list(net._blocks)[:_TAPS[-1][0] + 1])
        self.lateral = nn.ModuleList(nn.Conv2d(ch, width, 1) for _, ch in _TAPS)
        self.smooth = nn.ModuleList(_sep_conv(width) for _ in _TAPS[:-1])
        self.heat = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, num_classes, 1))
        self.box = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, 4, 1))
        # Start with a heatmap of ~0.1 everywhere (CenterNet's prior), so the focal loss of
        # the many empty cells does not swamp the first steps.
        nn.init.constant_(self.heat[-1].bias, -math.log((1 - 0.1) / 0.1))
        self.num_classes = num_classes
        self.input_size = (h, w)
        self.max_detections = max_detections
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou

    def backbone_modules(self) -> list[nn.Module]:
        """Pretrained parts, input side first: stem, then each block."""
        return [nn.ModuleList([self.stem, self.stem_bn]), *self.blocks]

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Heatmap logits [B, C, H/8, W/8] and box maps [B, 4, H/8, W/8]: centre offset within
        the cell (dx, dy) and log size in stride units (log w, log h)."""
        x = F.relu6(self.stem_bn(self.stem(x)))
        taps = []
        tap_at = {i for i, _ in _TAPS}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in tap_at:
                taps.append(x)
        p = self.lateral[-1](taps[-1])
        for level in (1, 0):  # top-down: stride 32 -> 16 -> 8
            lateral = self.lateral[level](taps[level])
            p = self.smooth[level](lateral + F.interpolate(p, size=lateral.shape[-2:],
                                                           mode="nearest"))
        return self.heat(p), self.box(p)

    def forward(self, x: torch.Tensor):
        heat, box = self.maps(x)
        if self.training:
            return heat, box
        return self.decode(heat, box)

    def decode(self, heat_logits: torch.Tensor, box: torch.Tensor):
        """One image's maps -> (boxes [N, 4], scores [N], labels [N]); ONNX-exportable."""
        c, h, w = heat_logits.shape[1:]
        heat = heat_logits[0].sigmoid()
        peaks = heat * (F.max_pool2d(heat[None], 3, stride=1, padding=1)[0] == heat)
        scores, idx = peaks.reshape(-1).topk(self.max_detections)
        labels = torch.div(idx, h * w, rounding_mode="floor")
        cell = idx - labels * (h * w)
        ys = torch.div(cell, w, rounding_mode="floor")
        xs = cell - ys * w
        reg = box[0].reshape(4, h * w)[:, cell]  # [4, K]
        cx = (xs.to(torch.float32) + reg[0]) * STRIDE
        cy = (ys.to(torch.float32) + reg[1]) * STRIDE
        bw = reg[2].clamp(max=8.0).exp() * STRIDE
        bh = reg[3].clamp(max=8.0).exp() * STRIDE
        ih, iw = self.input_size
        boxes = torch.stack([(cx - bw / 2).clamp(0, iw), (cy - bh / 2).clamp(0, ih),
                             (cx + bw / 2).clamp(0, iw), (cy + bh / 2).clamp(0, ih)], 1)
        keep = (scores > self.score_threshold) & ~_fast_nms(boxes, labels, self.nms_iou)
        return boxes[keep], scores[keep], labels[keep]


def _fast_nms(boxes: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Suppression mask for boxes sorted by score: a box goes when a higher-scoring box of its
    class overlaps it by more than `iou_threshold` (YOLACT's fast NMS: one matrix, no loop;
    unlike greedy NMS a suppressed box still suppresses, which only matters for chains)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lt = torch.max(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-6)
    same = labels[:, None] == labels[None, :]
    k = boxes.shape[0]
    earlier = torch.ones(k, k, dtype=torch.bool).triu(1)  # [j, i]: j ranks above i
    return ((iou > iou_threshold) & same & earlier).any(0)


def export_detector_onnx(model: CenterNetDetector, path: Path | str) -> Path:
    """Write the eval-mode detector (decoding and NMS included) as ONNX: input `image`
    float32 [1, 3, H, W]; outputs `boxes` [N, 4], `scores` [N], `labels` int64 [N]."""
    import warnings

    path = Path(path)
    h, w = model.input_size
    example = torch.zeros(1, 3, h, w)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=_OPSET,
                              input_names=["image"], output_names=["boxes", "scores", "labels"],
                              dynamic_axes={"boxes": {0: "N"}, "scores": {0: "N"},
                                            "labels": {0: "N"}})
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"ONNX export of the detector failed: {exc}") from exc
    finally:
        model.train(was_training)
    fold_pads(path)
    return path


def fold_pads(path: Path | str) -> int:
    """Fold every zero `Pad` that feeds only a `Conv` into that convolution's own (possibly
    asymmetric) `pads`, in place; returns how many were folded.

    EfficientNet-Lite0's TensorFlow "same" padding exports as a separate Pad before 17 of its
    convolutions, computed at run time from constants; onnxruntime copies the whole tensor
    for each and converts layouts around it, a third of the detector's CPU time at 160 px,
    while a convolution pads for free. The pad amounts are read by running the graph once
    (they are constants; the input's shape is fixed)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    path = Path(path)
    model = onnx.load(str(path))
    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    outputs = {o.name for o in graph.output}
    candidates = []
    for node in graph.node:
        if node.op_type != "Pad" or len(node.input) < 2:
            continue
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        users = consumers.get(node.output[0], [])
        if (mode != b"constant" or (len(node.input) > 2 and node.input[2])
                or len(users) != 1 or users[0].op_type != "Conv"
                or node.output[0] in outputs
                or any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET")
                       for a in users[0].attribute)):
            continue
        candidates.append((node, users[0]))
    if not candidates:
        return 0
    # The pad amounts: expose them as outputs and run once.
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for pad, _ in candidates:
        probe.graph.output.append(helper.make_tensor_value_info(pad.input[1],
                                                                onnx.TensorProto.INT64, None))
    shape = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [pad.input[1] for pad, _ in candidates]
    values = session.run(names, {graph.input[0].name: np.zeros(shape, np.float32)})
    folded = 0
    for (pad, conv), amounts in zip(candidates, values, strict=True):
        a = [int(v) for v in np.asarray(amounts).reshape(-1)]
        if len(a) != 8 or any(a[i] for i in (0, 1, 4, 5)) or min(a) < 0:
            continue  # pads batch or channels, or crops: not a convolution's padding
        old = next((list(x.ints) for x in conv.attribute if x.name == "pads"), [0, 0, 0, 0])
        new = [old[0] + a[2], old[1] + a[3], old[2] + a[6], old[3] + a[7]]
        for x in list(conv.attribute):
            if x.name == "pads":
                conv.attribute.remove(x)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)
        folded += 1
    # Drop what only computed the pad amounts.
    while True:
        used = {x for n in graph.node for x in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return folded


def onnx_detect(path: Path | str, image: np.ndarray, *, threads: int = 1
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run an exported detector on one contract-normalised image [1, 3, H, W]."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"image": np.asarray(image, np.float32)})
    return boxes, scores, labels
