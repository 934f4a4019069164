"""The deployable classifier: contract-normalised input -> backbone -> linear head -> logits.

Invariant: `ImageClassifier` takes exactly the tensor a bundle's `Preprocessing` describes
(the data set's size, channels and normalisation, NCHW); whatever the backbone needs on top of
that (another resolution, channel count or normalisation) happens inside the module, hence
inside the exported ONNX graph. In eval mode with `tta_flip` it averages the logits of the image
and its mirror image, in the same graph, so the device gets the exact model that was tested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import BackboneSpec

__all__ = ["ImageClassifier"]

_LUMA = (0.299, 0.587, 0.114)


class ImageClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, spec: BackboneSpec, num_classes: int, *,
                 input_channels: int, input_mean: tuple[float, ...],
                 input_std: tuple[float, ...], input_size: tuple[int, int], resolution: int,
                 dropout: float = 0.0, tta_flip: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(spec.feature_dim, num_classes)
        self.tta_flip = tta_flip
        self.in_channels = input_channels
        self.out_channels = spec.in_channels
        self.resize = tuple(input_size) != (resolution, resolution)
        self.resolution = resolution
        in_mean = torch.tensor(input_mean, dtype=torch.float32).view(1, -1, 1, 1)
        in_std = torch.tensor(input_std, dtype=torch.float32).view(1, -1, 1, 1)
        bb_mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        bb_std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("in_mean", in_mean)
        self.register_buffer("in_std", in_std)
        self.register_buffer("bb_mean", bb_mean)
        self.register_buffer("bb_std", bb_std)
        # When the contract already is what the backbone wants, skip the adapter entirely: on
        # a from-scratch net at native size it would cost a few percent of every step.
        self.identity_adapter = (not self.resize and input_channels == spec.in_channels
                                 and torch.allclose(in_mean, bb_mean)
                                 and torch.allclose(in_std, bb_std))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Contract input -> what the backbone expects (pixels, channels, size, its stats)."""
        if self.identity_adapter:
            return x
        x = x * self.in_std + self.in_mean  # back to [0, 1] pixels
        if self.in_channels == 1 and self.out_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif self.in_channels == 3 and self.out_channels == 1:
            luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * luma).sum(1, keepdim=True)
        if self.resize:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False)
        return (x - self.bb_mean) / self.bb_std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.adapt(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta_flip and not self.training:
            n = x.shape[0]
            logits = self.head(self.features(torch.cat([x, x.flip(3)])))
            return (logits[:n] + logits[n:]) * 0.5
        return self.head(self.dropout(self.features(x)))
