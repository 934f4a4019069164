"""Reading, writing and validating bundle directories.

Invariant: `validate_bundle` returns a manifest only when the directory holds exactly the
files the manifest lists (plus the manifest), each a regular file (never a symlink) with the
listed size and sha256, the model is an ONNX protobuf and no file is a pickle; an app
bundle's OCI layout is exactly its one image (`_oci`); a config bundle's files parse as the
formats it declares (`_config`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import BundleError
from ._manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    AdapterSpec,
    AppManifest,
    BundleManifest,
    ConfigManifest,
    DetectorSpec,
    FileEntry,
    GeneratorSpec,
    GoldenSpec,
    LlmAdapterManifest,
    LlmManifest,
    LlmSpec,
    Manifest,
    ObjectDetectionSpec,
    Preprocessing,
    check_relative_path,
    parse_manifest,
)

__all__ = [
    "GOLDEN_NAME",
    "MODEL_NAME",
    "GoldenSet",
    "file_sha256",
    "load_golden",
    "read_manifest",
    "validate_bundle",
    "write_bundle",
    "write_llm_bundle",
]

MODEL_NAME = "model.onnx"
GOLDEN_NAME = "golden.npz"
_CHUNK = 1 << 20
# Extensions of formats that are, or usually wrap, Python pickles: never accepted on a device.
_PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".bin"}
# Everything a bundle may carry: model weights only as ONNX, safetensors or GGUF (each checked
# by its header), plus data and documents that no loader executes.
_MODEL_SUFFIXES = {".onnx", ".safetensors", ".gguf"}
_DATA_SUFFIXES = {".data", ".npz", ".json", ".md", ".txt", ".png", ".jpg", ".jpeg", ".csv",
                  ".yaml", ".yml"}


@dataclass(frozen=True)
class GoldenSet:
    inputs: np.ndarray  # preprocessed model inputs, float32, batch-first
    outputs: np.ndarray  # the outputs the model must reproduce within `atol`


def file_sha256(path: Path) -> tuple[str, int]:
    """Return (sha256 hex, size) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _looks_like_pickle(head: bytes) -> bool:
    # Protocol 2+ pickles start with PROTO (0x80) and the protocol number.
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _zip_holds_pickle(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith((".pkl", "data.pkl")) or "/data/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def _onnx_files(manifest: Manifest) -> set[str]:
    if not isinstance(manifest, BundleManifest):
        return set()
    onnx_files = {manifest.model}
    for spec in (manifest.detector, manifest.generator):
        if spec is not None:
            onnx_files.add(spec.model)
    if manifest.generator is not None and manifest.generator.denoiser is not None:
        onnx_files.add(manifest.generator.denoiser)
    return onnx_files


def _check_file_kind(rel: str, path: Path, manifest: Manifest) -> None:
    if isinstance(manifest, AppManifest):
        from ._oci import is_oci_file

        if is_oci_file(rel):  # an image's blobs: checked as a whole by check_oci_layout
            return
    suffix = Path(rel).suffix.lower()
    if isinstance(manifest, ConfigManifest):
        _check_config_file(rel, path, suffix)
        return
    if suffix in _PICKLE_SUFFIXES:
        raise BundleError(f"{rel}: {suffix} files may hold pickles and are not allowed in a bundle")
    if suffix not in _MODEL_SUFFIXES | _DATA_SUFFIXES:
        raise BundleError(f"{rel}: {suffix or 'extension-less'} files are not allowed in a bundle "
                          "(models: .onnx, .safetensors, .gguf; data: "
                          f"{', '.join(sorted(_DATA_SUFFIXES))})")
    with open(path, "rb") as f:
        head = f.read(8)
    # A safetensors header length of 0x0280.. starts like a pickle; its header is parsed below.
    if suffix != ".safetensors" and _looks_like_pickle(head):
        raise BundleError(f"{rel}: file is a Python pickle; pickles are not allowed in a bundle")
    if head.startswith(b"PK") and _zip_holds_pickle(path):
        raise BundleError(f"{rel}: archive contains a pickle (torch checkpoint?); not allowed")
    if rel in _onnx_files(manifest) or suffix == ".onnx":
        _check_onnx(rel, path, head)
    elif suffix == ".safetensors":
        _check_safetensors(rel, path)
    elif suffix == ".gguf" and not head.startswith(b"GGUF"):
        raise BundleError(f"{rel}: not a GGUF file (bad magic)")


def _check_config_file(rel: str, path: Path, suffix: str) -> None:
    """Configuration files may have any name (an app decides what it reads), but never hold a
    pickle: nothing on a device unpickles, and no bundle carries one."""
    if suffix in _PICKLE_SUFFIXES:
        raise BundleError(f"{rel}: {suffix} files may hold pickles and are not allowed in a bundle")
    with open(path, "rb") as f:
        head = f.read(8)
    if _looks_like_pickle(head):
        raise BundleError(f"{rel}: file is a Python pickle; pickles are not allowed in a bundle")


def _check_safetensors(rel: str, path: Path) -> None:
    # 8-byte little-endian header length, then a JSON object of that length.
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise BundleError(f"{rel}: not a safetensors file (bad header length)")
        header = f.read(n)
    try:
        parsed = json.loads(header)
    except ValueError as exc:
        raise BundleError(f"{rel}: not a safetensors file (header is not JSON)") from exc
    if not isinstance(parsed, dict):
        raise BundleError(f"{rel}: not a safetensors file (header is not an object)")


def _check_onnx(rel: str, path: Path, head: bytes) -> None:
    # An ONNX ModelProto starts with field 1 (ir_version, varint) -> tag byte 0x08. Checking the
    # tag and that the file parses as the first protobuf fields is cheap and needs no onnx package.
    if not head.startswith(b"\x08"):
        raise BundleError(f"{rel}: not an ONNX model (expected a protobuf ModelProto)")
    with open(path, "rb") as f:
        data = f.read(4096)
    pos, end = 1, len(data)
    # skip the ir_version varint
    while pos < end and data[pos] & 0x80:
        pos += 1
    pos += 1
    if pos >= end and path.stat().st_size > pos:
        raise BundleError(f"{rel}: not an ONNX model (corrupt header)")
    if pos < path.stat().st_size and pos < end:
        field = data[pos] >> 3
        # ModelProto fields 2..25 exist; anything else right after ir_version is not ONNX.
        if not 1 <= field <= 25:
            raise BundleError(f"{rel}: not an ONNX model (unexpected protobuf field {field})")


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_NAME
    if path.is_symlink():
        raise BundleError(f"{MANIFEST_NAME} is a symlink; symlinks are not allowed in a bundle")
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST_NAME}; not an Edgewise bundle")
    return parse_manifest(path.read_bytes())


def validate_bundle(bundle_dir: Path | str) -> Manifest:
    """Fully validate a bundle directory and return its manifest, or raise `BundleError`."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: not a directory")
    manifest = read_manifest(bundle_dir)

    present: set[str] = set()
    for root, dirs, files in os.walk(bundle_dir, followlinks=False):
        for name in dirs + files:
            full = Path(root) / name
            rel = full.relative_to(bundle_dir).as_posix()
            if full.is_symlink():
                raise BundleError(f"{rel}: symlinks are not allowed in a bundle")
            if name in files:
                if not full.is_file():
                    raise BundleError(f"{rel}: not a regular file")
                present.add(rel)
    present.discard(MANIFEST_NAME)

    missing = sorted(set(manifest.files) - present)
    extra = sorted(present - set(manifest.files))
    if missing:
        raise BundleError(f"files listed in {MANIFEST_NAME} are missing: {', '.join(missing)}")
    if extra:
        raise BundleError(f"files not listed in {MANIFEST_NAME}: {', '.join(extra)}")

    for rel, entry in manifest.files.items():
        path = bundle_dir / rel
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(f"{rel}: size mismatch (manifest says {entry.size}, file has {size})")
        sha, _ = file_sha256(path)
        if sha != entry.sha256:
            raise BundleError(f"{rel}: sha256 mismatch; the file was modified or corrupted")
        _check_file_kind(rel, path, manifest)
    if isinstance(manifest, BundleManifest):  # an LLM's golden prompts are in the manifest
        load_golden(bundle_dir, manifest)
    elif isinstance(manifest, AppManifest):
        from ._oci import check_oci_layout

        check_oci_layout(bundle_dir, manifest)
    elif isinstance(manifest, ConfigManifest):
        from ._config import check_config_formats

        check_config_formats(bundle_dir, manifest)
    return manifest


def load_golden(bundle_dir: Path, manifest: BundleManifest) -> GoldenSet:
    """Load the golden set without ever unpickling (object arrays are refused)."""
    path = Path(bundle_dir) / manifest.golden.file
    try:
        with np.load(path, allow_pickle=False) as npz:
            inputs = np.asarray(npz["inputs"], dtype=np.float32)
            outputs = np.asarray(npz["outputs"], dtype=np.float32)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{manifest.golden.file}: unreadable golden set: {exc}") from exc
    expected_shape = manifest.preprocessing.input_shape(manifest.golden.count)
    if inputs.shape != expected_shape:
        raise BundleError(
            f"{manifest.golden.file}: inputs have shape {inputs.shape}, "
            f"the preprocessing contract says {expected_shape}"
        )
    if outputs.shape[0] != manifest.golden.count:
        raise BundleError(f"{manifest.golden.file}: {outputs.shape[0]} outputs for "
                          f"{manifest.golden.count} inputs")
    if manifest.detection is not None:
        if outputs.ndim != 3 or outputs.shape[2] != 6:
            raise BundleError(f"{manifest.golden.file}: a detector's golden outputs are "
                              f"[count, M, 6] box rows, not {list(outputs.shape)}")
        labels = outputs[:, :, 5]
        if not np.isfinite(outputs).all() or (labels < -1).any() \
                or (labels >= len(manifest.labels)).any() or (labels != np.round(labels)).any():
            raise BundleError(f"{manifest.golden.file}: golden box labels must be -1 (padding) "
                              f"or 0..{len(manifest.labels) - 1}")
    return GoldenSet(inputs=inputs, outputs=outputs)


def _write_files(out_dir: Path, contents: Mapping[str, Path | bytes]) -> dict[str, FileEntry]:
    """Write each file (bytes, or a copy of a file, streamed) and return its manifest entry."""
    files: dict[str, FileEntry] = {}
    for rel, src in contents.items():
        dest = out_dir / check_relative_path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dest.write_bytes(src)
            files[rel] = FileEntry(sha256=hashlib.sha256(src).hexdigest(), size=len(src))
            continue
        digest, size = hashlib.sha256(), 0
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                digest.update(chunk)
                fout.write(chunk)
                size += len(chunk)
        files[rel] = FileEntry(sha256=digest.hexdigest(), size=size)
    return files


def write_llm_bundle(
    out_dir: Path | str,
    *,
    name: str,
    version: str,
    llm: LlmSpec,
    gguf: Path,
    eval_text: str,
    extra_files: Mapping[str, Path | bytes] | None = None,
    metrics: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> LlmManifest:
    """Write a complete, self-validated LLM bundle directory and return its manifest. `llm`
    names the GGUF and evaluation-text files as they will be called inside the bundle."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    contents: dict[str, Path | bytes] = {llm.model: Path(gguf),
                                         llm.eval_text: eval_text.encode()}
    contents.update(extra_files or {})
    manifest = LlmManifest(
        format_version=FORMAT_VERSION, name=name, version=version, llm=llm,
        files=_write_files(out_dir, contents),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        metrics=dict(metrics or {}), provenance=dict(provenance or {}))
    (out_dir / MANIFEST_NAME).write_text(manifest.to_json())
    validate_bundle(out_dir)
    return manifest


def write_llm_adapter_bundle(
    out_dir: Path | str,
    *,
    name: str,
    version: str,
    adapter: AdapterSpec,
    gguf: Path,
    extra_files: Mapping[str, Path | bytes] | None = None,
    metrics: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> LlmAdapterManifest:
    """Write a complete, self-validated LLM adapter bundle directory and return its manifest;
    `adapter.adapter` names the GGUF adapter file as it will be called inside the bundle."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    contents: dict[str, Path | bytes] = {adapter.adapter: Path(gguf)}
    contents.update(extra_files or {})
    manifest = LlmAdapterManifest(
        format_version=FORMAT_VERSION, name=name, version=version, adapter=adapter,
        files=_write_files(out_dir, contents),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        metrics=dict(metrics or {}), provenance=dict(provenance or {}))
    (out_dir / MANIFEST_NAME).write_text(manifest.to_json())
    validate_bundle(out_dir)
    return manifest


def write_bundle(
    out_dir: Path | str,
    *,
    name: str,
    version: str,
    labels: list[str] | tuple[str, ...],
    preprocessing: Preprocessing,
    model: Path | bytes,
    golden_inputs: np.ndarray,
    golden_outputs: np.ndarray,
    atol: float,
    max_latency_ms: float,
    extra_files: Mapping[str, Path | bytes] | None = None,
    metrics: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    kind: str = "image-classifier",
    detector: DetectorSpec | None = None,
    generator: GeneratorSpec | None = None,
    detection: ObjectDetectionSpec | None = None,
) -> BundleManifest:
    """Write a complete, self-validated bundle directory and return its manifest. An object
    detector (`detection`) brings its contract file among `extra_files`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, inputs=np.asarray(golden_inputs, np.float32),
             outputs=np.asarray(golden_outputs, np.float32))
    contents: dict[str, Path | bytes] = {MODEL_NAME: model, GOLDEN_NAME: buf.getvalue()}
    for rel, src in (extra_files or {}).items():
        contents[check_relative_path(rel)] = src

    files = _write_files(out_dir, contents)

    manifest = BundleManifest(
        format_version=FORMAT_VERSION,
        name=name,
        version=version,
        labels=tuple(labels),
        preprocessing=preprocessing,
        golden=GoldenSpec(file=GOLDEN_NAME, count=len(golden_inputs), atol=atol,
                          max_latency_ms=max_latency_ms),
        files=files,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        metrics=dict(metrics or {}),
        provenance=dict(provenance or {}),
        kind=kind,
        detector=detector,
        generator=generator,
        detection=detection,
        requires=("object-detection",) if detection is not None else (),
    )
    (out_dir / MANIFEST_NAME).write_text(manifest.to_json())
    validate_bundle(out_dir)
    return manifest
