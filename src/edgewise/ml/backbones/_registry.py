"""The backbone registry: names to builders, specs and weight loading.

Invariant: `create_backbone` returns a module in eval mode whose `forward(x)` maps a float
tensor [N, spec.in_channels, H, W], normalised with `spec.mean`/`spec.std`, to pooled features
[N, spec.feature_dim]; when weights are loaded, every tensor of the file matched a parameter or
buffer of the model (strict), and nothing was unpickled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError

__all__ = [
    "BackboneSpec",
    "create_backbone",
    "get_backbone_spec",
    "list_backbones",
    "load_weights",
    "pretrained_weights_path",
    "register_backbone",
]

# ImageNet statistics on [0, 1] pixels, the usual torch convention.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What a caller must know to feed a backbone: the preprocessing contract and its output."""

    name: str
    feature_dim: int
    input_size: tuple[int, int]  # (height, width) the weights were trained at
    in_channels: int
    mean: tuple[float, ...]  # per channel, on [0, 1] pixels
    std: tuple[float, ...]
    pretrained_source: str | None  # human-readable origin of the default weights; None: none
    # How many blocks end at the network's generic mid-level features (for small data unlike
    # the pretraining data, see `ml.strategies`); None: the backbone has no `trunk(n, grid)`.
    mid_blocks: int | None = None

    @property
    def has_pretrained(self) -> bool:
        return self.pretrained_source is not None


@dataclass(frozen=True)
class _Entry:
    spec: BackboneSpec
    builder: Callable[..., nn.Module]
    default_weights: Callable[[], Path] | None


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    spec: BackboneSpec, *, default_weights: Callable[[], Path] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register `builder` (no arguments, returns an uninitialised-weights model)."""
    if (default_weights is None) != (spec.pretrained_source is None):
        raise BackboneError(f"{spec.name}: pretrained_source and default_weights go together")

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if spec.name in _REGISTRY:
            raise BackboneError(f"backbone {spec.name!r} is already registered")
        _REGISTRY[spec.name] = _Entry(spec, builder, default_weights)
        return builder

    return decorate


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_backbones())
        raise BackboneError(f"unknown backbone {name!r} (known: {known})") from None


def get_backbone_spec(name: str) -> BackboneSpec:
    return _entry(name).spec


def pretrained_weights_path(name: str) -> Path:
    """Local path of the default pretrained weights of `name` (never downloads)."""
    entry = _entry(name)
    if entry.default_weights is None:
        raise BackboneError(f"backbone {name!r} has no pretrained weights; use pretrained=False "
                            "or pass weights_path")
    try:
        path = Path(entry.default_weights())
    except ImportError as exc:
        raise BackboneError(f"{name}: the package holding its weights is not installed "
                            f"({exc}); install edgewise[ml]") from exc
    if not path.is_file():
        raise BackboneError(f"{name}: weights file {path} is missing")
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise BackboneError("reading .safetensors needs the `safetensors` package") from exc
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own untyped errors on bad input
            raise BackboneError(f"{path}: unreadable safetensors file: {exc}") from exc
    try:
        # weights_only: a weights file is untrusted input and must never run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise BackboneError(f"{path}: cannot load as a weights-only torch file: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path}: not a state_dict (a mapping of names to tensors)")
    return state


def load_weights(model: nn.Module, path: Path | str) -> None:
    """Load a .pth/.pt (weights only) or .safetensors state_dict into `model`, strictly."""
    state = _read_state_dict(Path(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneError(f"{path}: weights do not fit the model: {exc}") from exc


def create_backbone(
    name: str, *, pretrained: bool = True, weights_path: Path | str | None = None,
    in_channels: int | None = None,
) -> nn.Module:
    """Build backbone `name`, load weights (explicit file first, else its defaults), eval mode.

    `pretrained=True` on a backbone without pretrained weights is an error rather than a silent
    random initialisation, so a release can never ship an untrained backbone by accident.
    `in_channels` rebuilds a from-scratch backbone for another channel count (its builder must
    take `in_channels`); pretrained backbones keep theirs and the classifier converts.
    """
    entry = _entry(name)
    spec = entry.spec
    if in_channels is not None and in_channels != spec.in_channels:
        if pretrained or weights_path is not None:
            raise BackboneError(f"{name}: pretrained weights fix in_channels={spec.in_channels}")
        try:
            model = entry.builder(in_channels=in_channels)
        except TypeError as exc:
            raise BackboneError(f"{name}: its builder cannot change in_channels") from exc
        spec = replace(spec, in_channels=in_channels, mean=(spec.mean[0],) * in_channels,
                       std=(spec.std[0],) * in_channels)
    else:
        model = entry.builder()
    if weights_path is not None:
        load_weights(model, weights_path)
    elif pretrained:
        load_weights(model, pretrained_weights_path(name))
    model.spec = spec  # type: ignore[assignment]  # lets callers recover the contract
    return model.eval()
