"""Torch architectures a bundle's weights can be rebuilt into, and their structured pruning.

Invariant: `build_arch(name, config)` rebuilds exactly the module (every shape) whose
`state_dict` was saved with that config, so weights load strictly; `prune_arch` returns a
module with fewer channels (tensors sliced, never zero-masked) and the config that rebuilds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..backbones import create_backbone, get_backbone_spec
from ..backbones._efficientnet_lite import EfficientNetLite
from ..backbones._fast_cnn import FastCNN
from ..backbones._small_cnn import SmallCNN
from ..quick import FeatureHeadClassifier
from ._errors import NotApplicableError

__all__ = ["ARCHS", "CNNClassifier", "build_arch", "count_params", "prune_arch"]


class CNNClassifier(nn.Module):
    """SmallCNN features + linear head: the distillation student and a trainable baseline."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.backbone = SmallCNN(in_channels=in_channels, widths=tuple(widths))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _keep(n: int, ratio: float) -> int:
    k = max(1, round(n * ratio))
    # Multiples of 8 keep the vectorised kernels on their fast path.
    return max(8, (k // 8) * 8) if n >= 16 else k


def _top(importance: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(importance, k).indices).values


def _bn_like(bn: nn.BatchNorm2d, n: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(n, eps=bn.eps, momentum=bn.momentum)


def _slice_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    new = _bn_like(bn, len(idx))
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).copy_(getattr(bn, name)[idx])
    return new


def _conv_like(conv: nn.Conv2d, in_ch: int, out_ch: int, depthwise: bool = False) -> nn.Conv2d:
    # Same class (e.g. EfficientNet's "SAME"-padding conv), same kernel and stride.
    if type(conv) is nn.Conv2d:
        return nn.Conv2d(in_ch, out_ch, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, groups=out_ch if depthwise else 1,
                         bias=conv.bias is not None)
    return type(conv)(in_ch, out_ch, conv.kernel_size[0], stride=conv.stride[0],
                      groups=out_ch if depthwise else 1)


def _slice_conv(conv: nn.Conv2d, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None,
                depthwise: bool = False) -> nn.Conv2d:
    w = conv.weight
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None and not depthwise:
        w = w[:, in_idx]
    new = _conv_like(conv, w.shape[1] * (w.shape[0] if depthwise else 1), w.shape[0], depthwise)
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(conv.bias if out_idx is None else conv.bias[out_idx])
    return new


def _slice_linear_in(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(idx), lin.out_features)
    with torch.no_grad():
        new.weight.copy_(lin.weight[:, idx])
        new.bias.copy_(lin.bias)
    return new


# ---- backbones: EfficientNet-Lite (inverted residuals) and SmallCNN ---------------------------
# Every supported classifier has `.backbone` and a linear `.head`; pruning works on the
# backbone's channels and the head's matching input columns, whatever wraps them.

def _lite_mid_widths(net: EfficientNetLite) -> list[int]:
    return [b._depthwise_conv.out_channels for b in net._blocks]


def _prune_lite_block(block: nn.Module, idx: torch.Tensor) -> None:
    block._expand_conv = _slice_conv(block._expand_conv, idx, None)
    block._bn0 = _slice_bn(block._bn0, idx)
    block._depthwise_conv = _slice_conv(block._depthwise_conv, idx, None, depthwise=True)
    block._bn1 = _slice_bn(block._bn1, idx)
    block._project_conv = _slice_conv(block._project_conv, None, idx)


def _prune_lite(model: nn.Module, keep: float) -> dict[str, Any]:
    net = model.backbone
    for block in net._blocks:
        if not block.has_expand:
            continue  # its channels are the stem's; pruning them would reach into the stem
        n = block._depthwise_conv.out_channels
        importance = block._bn1.weight.abs() * block._project_conv.weight.abs().sum((0, 2, 3))
        _prune_lite_block(block, _top(importance.detach(), _keep(n, keep)))
    n = net._conv_head.out_channels
    importance = net._bn1.weight.abs() * model.head.weight.abs().sum(0)
    idx = _top(importance.detach(), _keep(n, keep))
    net._conv_head = _slice_conv(net._conv_head, idx, None)
    net._bn1 = _slice_bn(net._bn1, idx)
    model.head = _slice_linear_in(model.head, idx)
    return {"mid_widths": _lite_mid_widths(net), "head_width": len(idx)}


def _resize_lite(model: nn.Module, widths: dict[str, Any]) -> None:
    """Give a freshly built Lite classifier the pruned shapes recorded in `widths`."""
    net = model.backbone
    for block, width in zip(net._blocks, widths["mid_widths"], strict=True):
        if block.has_expand and width != block._depthwise_conv.out_channels:
            _prune_lite_block(block, torch.arange(width))
    idx = torch.arange(widths["head_width"])
    net._conv_head = _slice_conv(net._conv_head, idx, None)
    net._bn1 = _slice_bn(net._bn1, idx)
    model.head = _slice_linear_in(model.head, idx)


def _prune_plain_cnn(model: nn.Module, keep: float) -> dict[str, Any]:
    """SmallCNN / FastCNN: a chain of conv -> [pool] -> BN -> ReLU; every conv keeps the
    channels whose BN scale times the next layer's use of them is largest."""
    layers = model.backbone.features
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    prev_idx: torch.Tensor | None = None
    widths = []
    for n_conv, ci in enumerate(convs):
        bi = next(j for j in range(ci + 1, len(layers)) if isinstance(layers[j], nn.BatchNorm2d))
        conv, bn = layers[ci], layers[bi]
        if n_conv + 1 < len(convs):
            nxt = layers[convs[n_conv + 1]].weight.abs().sum((0, 2, 3))
        else:
            nxt = model.head.weight.abs().sum(0)
        importance = (bn.weight.abs() * nxt).detach()
        idx = _top(importance, _keep(conv.out_channels, keep))
        layers[ci] = _slice_conv(conv, idx, prev_idx)
        layers[bi] = _slice_bn(bn, idx)
        prev_idx = idx
        widths.append(len(idx))
    model.head = _slice_linear_in(model.head, prev_idx)
    model.backbone.feature_dim = widths[-1]
    return {"cnn_widths": widths}


def _resize_plain_cnn(model: nn.Module, widths: dict[str, Any]) -> None:
    in_ch = model.backbone.features[0].in_channels
    if isinstance(model.backbone, FastCNN):
        model.backbone = FastCNN(in_channels=in_ch, conv_widths=tuple(widths["cnn_widths"]))
    else:
        model.backbone = SmallCNN(in_channels=in_ch, widths=tuple(widths["cnn_widths"]))
    model.head = nn.Linear(widths["cnn_widths"][-1], model.head.out_features)


def _prune_backbone(model: nn.Module, keep: float) -> dict[str, Any]:
    if isinstance(model.backbone, EfficientNetLite):
        return _prune_lite(model, keep)
    if isinstance(model.backbone, SmallCNN | FastCNN):
        return _prune_plain_cnn(model, keep)
    raise NotApplicableError(f"no structured pruning for a {type(model.backbone).__name__} "
                             "backbone (supported: EfficientNet-Lite, SmallCNN, FastCNN)")


def _apply_widths(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    if isinstance(model.backbone, EfficientNetLite):
        # The ImageNet classifier is not part of the exported graph: leave it out of the
        # parameter count and of saved weights.
        model.backbone._fc = None
    widths = config.get("pruned")
    if widths:
        if isinstance(model.backbone, EfficientNetLite):
            _resize_lite(model, widths)
        else:
            _resize_plain_cnn(model, widths)
    return model


# ---- the classifiers -------------------------------------------------------------------------

def _feature_head(config: dict[str, Any]) -> nn.Module:
    """The quick recipe's `FeatureHeadClassifier`."""
    name = config["backbone"]
    spec = get_backbone_spec(name)
    model = FeatureHeadClassifier(create_backbone(name, pretrained=False), spec,
                                  nn.Linear(spec.feature_dim, config["num_classes"]),
                                  resolution=config["resolution"],
                                  input_mean=config["input_mean"], input_std=config["input_std"])
    return _apply_widths(model, config)


def _image_classifier(config: dict[str, Any]) -> nn.Module:
    """`edgewise train`'s `ImageClassifier` (config: its constructor's keyword arguments)."""
    from ..model import ImageClassifier

    name = config["backbone"]
    backbone = create_backbone(name, pretrained=False,
                               in_channels=config.get("backbone_in_channels"))
    spec = backbone.spec
    if "backbone_mean" in config:  # from scratch: the statistics it learned its input with
        spec = replace(spec, mean=tuple(config["backbone_mean"]),
                       std=tuple(config["backbone_std"]))
    if config.get("feature_blocks"):  # mid-level features (feature-extract, case 3)
        backbone = backbone.trunk(config["feature_blocks"], config["feature_grid"])
        spec = replace(spec, feature_dim=backbone.feature_dim)
    model = ImageClassifier(
        backbone, spec, config["num_classes"],
        input_channels=config["input_channels"], input_mean=tuple(config["input_mean"]),
        input_std=tuple(config["input_std"]), input_size=tuple(config["input_size"]),
        resolution=config["resolution"], tta_flip=bool(config.get("tta_flip", False)))
    return _apply_widths(model, config)


def _cnn(config: dict[str, Any]) -> nn.Module:
    model = CNNClassifier(config["in_channels"], tuple(config["widths"]), config["num_classes"])
    return _apply_widths(model, config)


ARCHS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "feature-head": _feature_head,
    "image-classifier": _image_classifier,
    "cnn-classifier": _cnn,
}


def build_arch(name: str, config: dict[str, Any]) -> nn.Module:
    if name not in ARCHS:
        raise NotApplicableError(f"unknown torch architecture {name!r} "
                                 f"(known: {', '.join(ARCHS)})")
    try:
        return ARCHS[name](config)
    except KeyError as exc:
        raise NotApplicableError(f"architecture {name!r}: config lacks {exc}") from None


def prune_arch(name: str, model: nn.Module, config: dict[str, Any], keep: float
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Remove the least important (1 - keep) of the prunable channels; returns a new config.

    Importance of a channel: |BatchNorm scale| x L1 norm of the weights that read it.
    """
    if not 0 < keep < 1:
        raise ValueError("keep must be in (0, 1)")
    if name not in ARCHS:
        raise NotApplicableError(f"unknown torch architecture {name!r}")
    training = model.training
    widths = _prune_backbone(model, keep)
    return model.train(training), {**config, "pruned": widths}  # new layers start in train mode
