"""A from-scratch CNN sized for 28x28 images on a CPU: conv-pool-BN-ReLU stages.

Invariant: no pretrained weights exist for it. Pooling sits right after the first conv of each
stage (as in the fast CIFAR-10 training recipes), so the expensive full-resolution activations
are few; on 2 CPU cores that buys about twice the images per second of a plain VGG stack of the
same depth, which is what a time budget turns into accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FastCNN"]


def _conv_bn_relu(i: int, o: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(i, o, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers + [nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


class FastCNN(nn.Module):
    """stem conv, then per width: conv + pool, conv; global average pooling."""

    def __init__(self, in_channels: int = 1, stem: int = 32,
                 widths: tuple[int, ...] = (64, 128, 256),
                 conv_widths: tuple[int, ...] | None = None) -> None:
        """`conv_widths` (one per conv: stem, then two per stage) overrides `stem`/`widths`:
        a structurally pruned net keeps the layout with fewer channels in each conv."""
        super().__init__()
        if conv_widths is None:
            conv_widths = (stem, *(w for width in widths for w in (width, width)))
        if len(conv_widths) % 2 != 1:
            raise ValueError("conv_widths: the stem, then two convs per stage")
        layers = _conv_bn_relu(in_channels, conv_widths[0], pool=False)
        prev = conv_widths[0]
        for first, second in zip(conv_widths[1::2], conv_widths[2::2], strict=True):
            layers += _conv_bn_relu(prev, first, pool=True) + _conv_bn_relu(first, second, False)
            prev = second
        self.features = nn.Sequential(*layers)
        self.feature_dim = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))
