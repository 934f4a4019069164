"""Tiny synthetic bundles for rehearsals: a real ONNX classifier (Flatten + MatMul) with a
real golden set, so devices run the real verification and health check in milliseconds; and
config components built by the builder `edgewise config build` uses, checked on the device
by their own manifest's command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..artifacts import Preprocessing, write_bundle, write_config_bundle

__all__ = ["synthetic_bundle", "synthetic_config_bundle"]

_LABELS = ("zero", "one", "two")
_PRE = Preprocessing(input_size=(4, 4), channels=1, mean=(0.5,), std=(0.25,))


def _tiny_onnx(weights: np.ndarray) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "sim",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weights.astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def synthetic_bundle(out: Path, *, name: str, version: str, broken: bool = False,
                     max_latency_ms: float = 1000.0, seed: int = 0) -> Path:
    """`broken`: the shipped weights swap the classes, so the golden set check fails."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(16, 3)).astype(np.float32)
    inputs = rng.normal(size=(6, 1, 4, 4)).astype(np.float32)
    outputs = inputs.reshape(6, 16) @ weights
    shipped = weights[:, ::-1].copy() if broken else weights
    write_bundle(out, name=name, version=version, labels=_LABELS, preprocessing=_PRE,
                 model=_tiny_onnx(shipped), golden_inputs=inputs, golden_outputs=outputs,
                 atol=1e-3, max_latency_ms=max_latency_ms,
                 extra_files={"MODEL_CARD.md": f"# {name} {version}\nSimulated.\n".encode()})
    return out


# The device runs this on the files in the inactive slot before they may become current.
CONFIG_CHECK = {"command": ["sh", "-c", "! grep -q ^invalid mode.txt"], "timeout_s": 10}


def synthetic_config_bundle(out: Path, *, name: str, version: str, broken: bool = False,
                            seed: int = 0) -> Path:
    """Config files `settings.json`, `limits.toml` and `mode.txt`; `broken`: mode.txt says
    "invalid", which the manifest's check refuses on the device (the bundle itself builds and
    verifies: only the device's check catches it, as a bad value would be caught)."""
    src = out.with_name(f".{out.name}.src")
    src.mkdir(parents=True, exist_ok=True)
    threshold = float(np.random.default_rng(seed).uniform(0.5, 0.9))
    (src / "settings.json").write_text(
        json.dumps({"name": name, "version": version, "threshold": round(threshold, 3)}))
    (src / "limits.toml").write_text(f'version = "{version}"\nmax_batch = 4\n')
    (src / "mode.txt").write_text("invalid\n" if broken else "ok\n")
    write_config_bundle(out, sorted(src.iterdir()), name=name, version=version,
                        check=CONFIG_CHECK, provenance={"simulated": True})
    return out
