"""The backbone registry: every entry honours the contract; EfficientNet-Lite0 loads for real."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch

from edgewise.ml import BackboneError
from edgewise.ml.backbones import (
    BackboneSpec,
    create_backbone,
    get_backbone_spec,
    list_backbones,
    pretrained_weights_path,
)


@pytest.mark.parametrize("name", list_backbones())
def test_registry_contract(name: str) -> None:
    spec = get_backbone_spec(name)
    assert isinstance(spec, BackboneSpec) and spec.name == name
    assert len(spec.mean) == len(spec.std) == spec.in_channels
    model = create_backbone(name, pretrained=spec.has_pretrained)
    assert not model.training
    assert model.spec == spec
    x = torch.randn(2, spec.in_channels, *spec.input_size)
    with torch.inference_mode():
        feats = model(x)
    assert feats.shape == (2, spec.feature_dim)
    assert torch.isfinite(feats).all()
    if spec.has_pretrained:
        assert pretrained_weights_path(name).is_file()


def test_unknown_backbone() -> None:
    with pytest.raises(BackboneError, match="unknown backbone 'resnet-9000'"):
        create_backbone("resnet-9000")


def test_pretrained_without_weights_is_an_error() -> None:
    with pytest.raises(BackboneError, match="no pretrained weights"):
        create_backbone("small-cnn")


def test_weights_path_round_trip(tmp_path: Path) -> None:
    source = create_backbone("small-cnn", pretrained=False)
    path = tmp_path / "small.pth"
    torch.save(source.state_dict(), path)
    loaded = create_backbone("small-cnn", weights_path=path)
    x = torch.randn(1, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), source(x))


def test_mismatched_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save({"not.a.key": torch.zeros(3)}, path)
    with pytest.raises(BackboneError, match="do not fit the model"):
        create_backbone("small-cnn", weights_path=path)


class _Payload:
    def __reduce__(self):  # would run code if ever unpickled
        return (print, ("unpickled!",))


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"w": _Payload()}, protocol=2))
    with pytest.raises(BackboneError, match="weights-only"):
        create_backbone("small-cnn", weights_path=path)


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return create_backbone("efficientnet-lite0")


def test_lite0_state_dict_matches_checkpoint_exactly(lite0: torch.nn.Module) -> None:
    ckpt = torch.load(pretrained_weights_path("efficientnet-lite0"), weights_only=True)
    ours = lite0.state_dict()
    assert set(ours) == set(ckpt)
    for key, tensor in ckpt.items():
        assert ours[key].shape == tensor.shape, key
        assert torch.equal(ours[key], tensor), key


def test_lite0_feature_map_is_tensorflow_same_shaped(lite0: torch.nn.Module) -> None:
    # TF "SAME": every stride-2 stage gives ceil(n / 2), so 224 -> 7 and 65 -> 3.
    with torch.inference_mode():
        assert lite0.forward_map(torch.zeros(1, 3, 224, 224)).shape == (1, 1280, 7, 7)
        assert lite0.forward_map(torch.zeros(1, 3, 65, 65)).shape == (1, 1280, 3, 3)


def _synthetic_images() -> torch.Tensor:
    # Smooth colour gradients and a few shapes: natural-ish statistics, fully deterministic.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    disc = (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.08).float()
    stripes = (torch.sin(xx * 40) > 0).float()
    a = torch.stack([xx, yy, 1 - xx])
    b = torch.stack([disc, disc * 0.5, 1 - disc])
    c = torch.stack([stripes, stripes, stripes * 0.2])
    return torch.stack([a, b, c])


def test_lite0_imagenet_classifier_is_not_degenerate(lite0: torch.nn.Module) -> None:
    spec = get_backbone_spec("efficientnet-lite0")
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        probs = lite0.classify((_synthetic_images() - mean) / std).softmax(-1)
    assert torch.isfinite(probs).all()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    # An unloaded model gives exactly uniform output (entropy log(1000) = 6.91) and the same class
    # for every image; the real weights give 5.3-5.7 here, with a clear but unsure favourite.
    assert (entropy < 0.9 * math.log(1000)).all()
    assert (probs.max(-1).values > 0.02).all()
    assert (probs.max(-1).values < 0.999).all()
    assert len(set(probs.argmax(-1).tolist())) > 1, "different images, same class: collapsed"


def test_lite0_stem_batchnorm_fits_inception_scaling(lite0: torch.nn.Module) -> None:
    # The checkpoint's stem BN statistics were collected under its training preprocessing; under
    # the spec's normalisation the stem outputs must have about the recorded variance. ImageNet
    # mean/std give ~8x too much, an unloaded model ~0.14 (this is how the spec's mean/std were
    # chosen; measured 1.7 on these images).
    spec = get_backbone_spec("efficientnet-lite0")
    x = (_synthetic_images() - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(
        spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        stem = lite0._conv_stem(x)
    ratio = stem.var(dim=(0, 2, 3)) / lite0._bn0.running_var
    assert 0.5 < ratio.median().item() < 3.0
