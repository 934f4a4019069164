"""Torch weights for a bundle: where pruning and distillation get a trainable module.

A bundle carries torch weights in one of two ways, tried in this order:

1. **Explicit** (what `edgewise train` and `edgewise compress` write): an optional
   `weights.safetensors` file listed in the manifest, and `provenance["torch"] =
   {"arch": <name in ARCHS>, "config": {...}, "weights": "weights.safetensors"}`.
   safetensors is not a pickle, so the bundle stays acceptable to a device.
2. **Rebuilt** for the quick recipe's bundles, which carry no torch file: the frozen backbone
   comes from the local pretrained weights whose sha256 the provenance records, the head's
   weights from the ONNX graph's final Gemm.

Invariant: whichever way, the module is returned only after it reproduced the bundle's golden
outputs within the golden `atol`; a module that does not is refused, never used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgewise.artifacts import BundleManifest, file_sha256, load_golden

from ._errors import NotApplicableError

if TYPE_CHECKING:
    from torch import nn
# torch is imported inside the functions: `edgewise llm size` and `fit` must not pay for it.

__all__ = ["TORCH_KEY", "WEIGHTS_FILE", "TorchModel", "load_torch_model", "weights_bytes"]

WEIGHTS_FILE = "weights.safetensors"
TORCH_KEY = "torch"
QUICK_RECIPE = "edgewise.ml.quick.build_feature_head_bundle"


@dataclass
class TorchModel:
    module: nn.Module
    arch: str
    config: dict[str, Any]
    source: str  # how the weights were obtained, for the report


def weights_bytes(module: nn.Module) -> bytes:
    """The module's state_dict as safetensors bytes that no pickle sniffer can mistake."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    pad = ""
    while True:
        data = save(state, metadata={"format": "pt", "pad": pad})
        # The file starts with its little-endian header length; a length whose low bytes are
        # 0x80 0x02..0x05 looks like a pickle's PROTO opcode to the bundle validator.
        if not (data[0] == 0x80 and 2 <= data[1] <= 5):
            return data
        pad += " "


def _check_parity(module: nn.Module, bundle_dir: Path, manifest: BundleManifest) -> float:
    import torch

    golden = load_golden(bundle_dir, manifest)
    with torch.inference_mode():
        got = module.eval()(torch.from_numpy(golden.inputs)).numpy()
    if got.shape != golden.outputs.shape:
        raise NotApplicableError(f"rebuilt torch model gives shape {got.shape}, the golden set "
                                 f"{golden.outputs.shape}")
    diff = float(np.abs(got - golden.outputs).max())
    if not diff <= manifest.golden.atol:
        raise NotApplicableError(f"rebuilt torch model does not reproduce the golden outputs "
                                 f"(max |diff| {diff:.3g} > atol {manifest.golden.atol})")
    return diff


def _explicit(bundle_dir: Path, manifest: BundleManifest, spec: dict[str, Any]) -> TorchModel:
    from safetensors.torch import load_file

    from ._archs import build_arch

    rel = spec.get("weights", WEIGHTS_FILE)
    if rel not in manifest.files:
        raise NotApplicableError(f"provenance names torch weights {rel!r} but the bundle does "
                                 "not list that file")
    module = build_arch(spec["arch"], dict(spec.get("config", {})))
    try:
        state = load_file(str(bundle_dir / rel))
        # A backbone's own ImageNet classifier may be saved with it; the classifier never
        # uses it (see _archs._apply_widths).
        state = {k: v for k, v in state.items() if not k.startswith("backbone._fc.")}
        module.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors and torch raise several types for a bad file
        raise NotApplicableError(f"{rel}: does not load into {spec['arch']}: {exc}") from exc
    return TorchModel(module, spec["arch"], dict(spec.get("config", {})), f"bundle {rel}")


def _onnx_head(model_path: Path) -> tuple[np.ndarray, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path)).graph
    inits = {t.name: t for t in graph.initializer}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    if not gemms or len(gemms[-1].input) < 3 or gemms[-1].input[1] not in inits:
        raise NotApplicableError("the ONNX graph has no final Gemm with constant weights")
    node = gemms[-1]
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    weight = numpy_helper.to_array(inits[node.input[1]])
    bias = numpy_helper.to_array(inits[node.input[2]])
    return (weight if trans_b else weight.T), bias


def _rebuilt_quick(bundle_dir: Path, manifest: BundleManifest) -> TorchModel:
    import torch

    from ..backbones import create_backbone, pretrained_weights_path
    from ._archs import build_arch

    prov = manifest.provenance
    pre = manifest.preprocessing
    if pre.channels != 1:
        raise NotApplicableError("the quick recipe only builds grayscale models")
    weights = pretrained_weights_path(prov["backbone"])
    sha, _ = file_sha256(weights)
    if sha != prov.get("backbone_weights_sha256"):
        raise NotApplicableError(f"the local {prov['backbone']} weights ({sha[:12]}) are not the "
                                 "ones this bundle was built with")
    w, b = _onnx_head(bundle_dir / manifest.model)
    config = {"backbone": prov["backbone"], "resolution": int(manifest.metrics["resolution"]),
              "num_classes": int(w.shape[0]), "input_mean": float(pre.mean[0]),
              "input_std": float(pre.std[0])}
    module = build_arch("feature-head", config)
    # Strict load into a complete backbone, then everything but its ImageNet classifier.
    full = create_backbone(prov["backbone"], weights_path=weights).state_dict()
    module.backbone.load_state_dict(
        {k: v for k, v in full.items() if not k.startswith("_fc.")}, strict=True)
    with torch.no_grad():
        module.head.weight.copy_(torch.from_numpy(np.array(w)))
        module.head.bias.copy_(torch.from_numpy(np.array(b)))
    return TorchModel(module, "feature-head", config,
                      f"rebuilt: {prov['backbone']} pretrained weights + ONNX head")


def load_torch_model(bundle_dir: Path, manifest: BundleManifest) -> TorchModel:
    """A torch module equivalent to the bundle's model (checked on the golden set)."""
    spec = manifest.provenance.get(TORCH_KEY)
    if isinstance(spec, dict) and "arch" in spec:
        found = _explicit(bundle_dir, manifest, spec)
    elif manifest.provenance.get("recipe") == QUICK_RECIPE:
        try:
            found = _rebuilt_quick(bundle_dir, manifest)
        except KeyError as exc:
            raise NotApplicableError(f"quick-recipe provenance lacks {exc}") from None
    else:
        raise NotApplicableError(
            f"the bundle carries no torch weights (no {WEIGHTS_FILE} with "
            f"provenance.{TORCH_KEY}.arch) and is not a quick-recipe bundle; pruning needs one "
            f"of them. Provenance keys: {json.dumps(sorted(manifest.provenance))}")
    _check_parity(found.module, bundle_dir, manifest)
    return found
