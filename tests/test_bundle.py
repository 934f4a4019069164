"""Bundle format v1: what validation accepts and everything it must refuse."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from edgewise.artifacts import BundleError, file_sha256, parse_manifest, validate_bundle
from tests.conftest import make_tiny_bundle


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_tiny_bundle(tmp_path / "b")


def _edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "edgewise.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _relist(bundle: Path, rel: str) -> None:
    sha, size = file_sha256(bundle / rel)
    _edit_manifest(bundle, lambda d: d["files"].__setitem__(rel, {"sha256": sha, "size": size}))


def test_valid_bundle_round_trips(bundle: Path) -> None:
    manifest = validate_bundle(bundle)
    assert manifest.name == "tiny" and manifest.version == "1.0.0"
    assert manifest.labels == ("zero", "one", "two")
    assert manifest.preprocessing.input_size == (4, 4)
    assert set(manifest.files) == {"model.onnx", "golden.npz", "MODEL_CARD.md"}
    assert parse_manifest(manifest.to_json()) == manifest


def test_unknown_format_version(bundle: Path) -> None:
    _edit_manifest(bundle, lambda d: d.__setitem__("format_version", 2))
    with pytest.raises(BundleError, match="unknown bundle format version 2"):
        validate_bundle(bundle)


def test_missing_file(bundle: Path) -> None:
    (bundle / "MODEL_CARD.md").unlink()
    with pytest.raises(BundleError, match="missing: MODEL_CARD.md"):
        validate_bundle(bundle)


def test_extra_file(bundle: Path) -> None:
    (bundle / "notes.txt").write_text("surprise")
    with pytest.raises(BundleError, match="not listed.*notes.txt"):
        validate_bundle(bundle)


def test_hash_mismatch(bundle: Path) -> None:
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx: sha256 mismatch"):
        validate_bundle(bundle)


def test_size_mismatch(bundle: Path) -> None:
    with open(bundle / "MODEL_CARD.md", "ab") as f:
        f.write(b"more")
    with pytest.raises(BundleError, match="MODEL_CARD.md: size mismatch"):
        validate_bundle(bundle)


@pytest.mark.parametrize("path", ["/etc/passwd", "../escape.txt", "a/../../b", "./x", "C:/x"])
def test_unsafe_paths(bundle: Path, path: str) -> None:
    _edit_manifest(bundle, lambda d: d["files"].__setitem__(
        path, {"sha256": "0" * 64, "size": 1}))
    with pytest.raises(BundleError, match="invalid file path"):
        validate_bundle(bundle)


def test_symlink_refused(bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.md"
    outside.write_bytes((bundle / "MODEL_CARD.md").read_bytes())
    (bundle / "MODEL_CARD.md").unlink()
    os.symlink(outside, bundle / "MODEL_CARD.md")
    with pytest.raises(BundleError, match="symlinks are not allowed"):
        validate_bundle(bundle)


def test_non_onnx_model_refused(bundle: Path) -> None:
    (bundle / "model.onnx").write_bytes(b"GGUF\x03\x00\x00\x00not an onnx model")
    _relist(bundle, "model.onnx")
    with pytest.raises(BundleError, match="not an ONNX model"):
        validate_bundle(bundle)


def test_pickled_model_refused(bundle: Path) -> None:
    (bundle / "model.onnx").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    _relist(bundle, "model.onnx")
    with pytest.raises(BundleError, match="pickle"):
        validate_bundle(bundle)


@pytest.mark.parametrize("name", ["weights.pt", "extra.pkl", "model.pth"])
def test_pickle_extensions_refused(bundle: Path, name: str) -> None:
    (bundle / name).write_bytes(b"\x00harmless bytes but a pickle-format name")
    _relist(bundle, name)
    with pytest.raises(BundleError, match="pickles"):
        validate_bundle(bundle)


def test_pickle_hidden_under_another_name_refused(bundle: Path) -> None:
    (bundle / "labels.json").write_bytes(pickle.dumps(["a", "b"], protocol=4))
    _relist(bundle, "labels.json")
    with pytest.raises(BundleError, match="pickle"):
        validate_bundle(bundle)


def test_golden_set_with_object_array_refused(bundle: Path) -> None:
    import numpy as np

    np.savez(bundle / "golden.npz", inputs=np.array([{"evil": 1}], dtype=object),
             outputs=np.zeros((6, 3), np.float32))
    _relist(bundle, "golden.npz")
    with pytest.raises(BundleError, match="golden"):
        validate_bundle(bundle)


def test_golden_shape_must_match_contract(bundle: Path) -> None:
    import numpy as np

    np.savez(bundle / "golden.npz", inputs=np.zeros((6, 3, 4, 4), np.float32),
             outputs=np.zeros((6, 3), np.float32))
    _relist(bundle, "golden.npz")
    with pytest.raises(BundleError, match="preprocessing contract"):
        validate_bundle(bundle)


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"format_version": 1}'])
def test_malformed_manifest(bundle: Path, raw: bytes) -> None:
    (bundle / "edgewise.json").write_bytes(raw)
    with pytest.raises(BundleError):
        validate_bundle(bundle)


def test_no_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not an Edgewise bundle"):
        validate_bundle(tmp_path)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("run.sh", b"#!/bin/sh\nrm -rf /\n", "not allowed in a bundle"),
    ("lib.so", b"\x7fELF....", "not allowed in a bundle"),
    ("weights.safetensors", b"\x00" * 16, "not a safetensors file"),
    ("weights.safetensors", (5).to_bytes(8, "little") + b"[1,2]", "not an object"),
    ("llm.gguf", b"GGML-but-not-GGUF", "not a GGUF file"),
    ("extra.onnx", b"PK\x03\x04 zip", "not an ONNX model"),
])
def test_only_known_model_and_data_formats(bundle: Path, name: str, content: bytes,
                                           message: str) -> None:
    (bundle / name).write_bytes(content)
    _relist(bundle, name)
    with pytest.raises(BundleError, match=message):
        validate_bundle(bundle)


def test_valid_safetensors_and_gguf_extras_are_accepted(bundle: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (bundle / "weights.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\x00" * 8)
    (bundle / "llm.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 16)
    for name in ("weights.safetensors", "llm.gguf"):
        _relist(bundle, name)
    validate_bundle(bundle)


def test_safetensors_whose_header_length_looks_like_a_pickle_opcode(bundle: Path) -> None:
    # A 640-byte header is b"\x80\x02..." on disk: the PROTO opcode of a pickle, by accident.
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "__metadata__": {"pad": "x" * 500}}).encode()
    header += b" " * (640 - len(header))
    assert len(header).to_bytes(8, "little")[:2] == b"\x80\x02"
    (bundle / "weights.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\x00" * 8)
    _relist(bundle, "weights.safetensors")
    validate_bundle(bundle)
