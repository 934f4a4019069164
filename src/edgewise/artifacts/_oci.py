"""OCI image layouts as app bundles: validation and writing (no container engine needed).

Invariant: an app bundle that validated holds exactly one image, whose index entry, manifest,
config and layers are all files of the bundle, each named by its sha256 and of the size its
descriptor says, and no blob the image does not reference. So the files that TUF signs are
the image, and a blob a device already holds is the same bytes whatever release it came from.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._errors import BundleError
from ._manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    OCI_INDEX,
    OCI_LAYOUT,
    AppManifest,
    AppSpec,
    FileEntry,
    oci_blob_path,
)

__all__ = ["OCI_FILES", "PodmanStore", "check_oci_layout", "containers_conf", "image_blobs",
           "is_oci_file", "read_image", "write_app_bundle"]

OCI_FILES = frozenset({OCI_INDEX, OCI_LAYOUT})
_MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json"}
_LAYER_PREFIXES = ("application/vnd.oci.image.layer.v1.tar",
                   "application/vnd.docker.image.rootfs.diff.tar")
_MAX_JSON_BYTES = 4 << 20


def is_oci_file(rel: str) -> bool:
    return rel in OCI_FILES or rel.startswith("blobs/")


def _json(path: Path, what: str) -> Any:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise BundleError(f"{what} is larger than {_MAX_JSON_BYTES >> 20} MB")
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{what} is missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{what} is not valid JSON: {exc}") from exc


def _descriptor(d: Any, what: str) -> tuple[str, int, str]:
    if not isinstance(d, dict):
        raise BundleError(f"{what}: not a descriptor object")
    digest, size, media = d.get("digest"), d.get("size"), d.get("mediaType", "")
    if not (isinstance(digest, str) and digest.startswith("sha256:") and len(digest) == 71
            and all(c in "0123456789abcdef" for c in digest[7:])):
        raise BundleError(f"{what}: digest {digest!r} is not a sha256 digest")
    if not isinstance(size, int) or size < 0:
        raise BundleError(f"{what}: invalid size {size!r}")
    return digest, size, str(media)


def read_image(layout: Path, ref: str | None = None) -> tuple[str, dict[str, Any]]:
    """The (manifest digest, index entry) of the image `ref` in an OCI layout (or of its one
    image when `ref` is None)."""
    layout = Path(layout)
    marker = _json(layout / OCI_LAYOUT, OCI_LAYOUT)
    if not isinstance(marker, dict) or marker.get("imageLayoutVersion") != "1.0.0":
        raise BundleError(f"{OCI_LAYOUT}: not an OCI image layout 1.0.0")
    index = _json(layout / OCI_INDEX, OCI_INDEX)
    entries = index.get("manifests") if isinstance(index, dict) else None
    if index.get("schemaVersion") != 2 or not isinstance(entries, list) or not entries:
        raise BundleError(f"{OCI_INDEX}: not an OCI image index with manifests")
    if ref is not None:
        entries = [e for e in entries if isinstance(e, dict) and
                   (e.get("annotations") or {}).get("org.opencontainers.image.ref.name") == ref]
        if not entries:
            raise BundleError(f"{OCI_INDEX}: no image tagged {ref!r}")
    if len(entries) != 1:
        raise BundleError(f"{OCI_INDEX}: {len(entries)} images; an app bundle holds one")
    digest, _, media = _descriptor(entries[0], f"{OCI_INDEX} entry")
    if media not in _MANIFEST_TYPES:
        raise BundleError(f"{OCI_INDEX}: {media!r} is not an image manifest (multi-platform "
                          "indexes are not supported: import one platform's image)")
    return digest, entries[0]


def image_blobs(layout: Path, manifest_digest: str) -> dict[str, int]:
    """Every blob of one image, digest -> size: its manifest, config and layers."""
    path = Path(layout) / oci_blob_path(manifest_digest)
    manifest = _json(path, f"image manifest {manifest_digest}")
    if not isinstance(manifest, dict) or manifest.get("schemaVersion") != 2:
        raise BundleError(f"image manifest {manifest_digest}: not a schema 2 image manifest")
    blobs = {manifest_digest: path.stat().st_size}
    config, size, _ = _descriptor(manifest.get("config"), "image config")
    blobs[config] = size
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise BundleError(f"image manifest {manifest_digest}: no layer list")
    for i, layer in enumerate(layers):
        digest, size, media = _descriptor(layer, f"layer {i}")
        if not media.startswith(_LAYER_PREFIXES):
            raise BundleError(f"layer {i}: {media!r} is not a layer media type")
        blobs[digest] = size
    return blobs


def check_oci_layout(bundle_dir: Path, manifest: AppManifest) -> None:
    """The bundle's files are exactly the image `manifest.app` names (see the invariant)."""
    digest, entry = read_image(bundle_dir, manifest.app.ref)
    if digest != manifest.app.digest:
        raise BundleError(f"{OCI_INDEX}: image {manifest.app.ref!r} is {digest}, the manifest "
                          f"says {manifest.app.digest}")
    blobs = image_blobs(bundle_dir, digest)
    if entry.get("size") != blobs[digest]:
        raise BundleError(f"{OCI_INDEX}: the image manifest's size differs from its blob")
    for blob, size in blobs.items():
        rel = oci_blob_path(blob)
        listed = manifest.files.get(rel)
        if listed is None:
            raise BundleError(f"{rel}: the image references it, {MANIFEST_NAME} does not list it")
        if listed.size != size:
            raise BundleError(f"{rel}: the image says {size} bytes, the file has {listed.size}")
    stray = sorted(rel for rel in manifest.files
                   if rel.startswith("blobs/") and rel not in {oci_blob_path(b) for b in blobs})
    if stray:
        raise BundleError(f"blobs the image does not reference: {', '.join(stray)}")


def write_app_bundle(out_dir: Path, layout: Path, *, name: str, version: str, app: dict,
                     ref: str | None = None, metrics: Mapping[str, Any] | None = None,
                     provenance: Mapping[str, Any] | None = None,
                     depends: Mapping[str, str] | None = None) -> AppManifest:
    """Write an app bundle from one image of an OCI layout: its index entry, the marker and
    the image's blobs, plus `edgewise.json` with the `app` section (image name, health check,
    restart policy, env, ports; `ref` and `digest` are filled in here) and the releases it
    `depends` on (name -> version range). Validated; `out_dir` must not exist yet (a failure
    leaves nothing behind)."""
    from ._bundle import file_sha256, validate_bundle

    layout, out_dir = Path(layout), Path(out_dir)
    if out_dir.exists():
        raise BundleError(f"{out_dir} already exists: give a new directory")
    digest, entry = read_image(layout, ref)
    blobs = image_blobs(layout, digest)
    tag = (entry.get("annotations") or {}).get("org.opencontainers.image.ref.name") or "latest"
    entry = {**entry, "annotations": {**(entry.get("annotations") or {}),
                                       "org.opencontainers.image.ref.name": tag}}
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "blobs" / "sha256").mkdir(parents=True)
        (staging / OCI_LAYOUT).write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        (staging / OCI_INDEX).write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
        for blob in blobs:
            src = layout / oci_blob_path(blob)
            if not src.is_file():
                raise BundleError(f"the image references {blob}, which its layout lacks")
            shutil.copyfile(src, staging / oci_blob_path(blob))
        files = {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            sha, size = file_sha256(path)
            files[path.relative_to(staging).as_posix()] = FileEntry(sha256=sha, size=size)
        try:
            manifest = AppManifest(
                format_version=FORMAT_VERSION, name=name, version=version, files=files,
                app=AppSpec.model_validate({**app, "ref": tag, "digest": digest}),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                metrics=dict(metrics or {}), provenance=dict(provenance or {}),
                depends=dict(depends or {}),
                requires=("oci-app", "depends") if depends else ("oci-app",))
        except ValueError as exc:
            raise BundleError(f"invalid app bundle: {exc}") from exc
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        validate_bundle(staging)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest



def _runtime_dir(directory: Path) -> Path:
    """Podman's run root (locks, sockets: on tmpfs, gone at reboot as podman expects) for the
    store at `directory`. Podman refuses run roots longer than 50 characters, so it is a short
    path named by a hash of `directory`, not a path inside it."""
    import hashlib
    import os
    import tempfile

    key = hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:16]
    base = Path("/run") if os.access("/run", os.W_OK) else Path(
        os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    return base / f"edgewise-{key}"


@dataclass(frozen=True)
class PodmanStore:
    """A podman image and container store of our own: images and containers under
    `directory`, run-time files in a short path under /run, and our `containers.conf`."""

    directory: Path

    @property
    def graph_root(self) -> Path:
        return self.directory / "storage"

    @property
    def run_root(self) -> Path:
        return _runtime_dir(self.directory) / "run"

    def podman_args(self) -> list[str]:
        return ["--root", str(self.graph_root), "--runroot", str(self.run_root),
                "--storage-driver", "overlay"]

    def skopeo_ref(self, image: str) -> str:
        return f"containers-storage:[overlay@{self.graph_root}+{self.run_root}]{image}"

    def env(self) -> dict[str, str]:
        conf = containers_conf(self.directory, tmp_dir=_runtime_dir(self.directory) / "tmp")
        return {"CONTAINERS_CONF": str(conf)}


def containers_conf(directory: Path, *, tmp_dir: Path | None = None) -> Path:
    """Write (if changed) and return `directory/containers.conf`, with which podman runs on
    machines without systemd, on cgroups v1 hybrid and where the open-files limit cannot be
    raised: runc (crun refuses hybrid cgroups), container ulimits no higher than this
    process's hard limits, the cgroupfs manager and file events when systemd is not PID 1, and
    `tmp_dir` for podman's temporary files if given (a store of our own: separate agents must
    not share /run/libpod; podman remembers it per store, so never for the user's store). Pass
    it in the `CONTAINERS_CONF` environment variable."""
    import resource

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 20000 if nofile == resource.RLIM_INFINITY else min(nofile, 20000)
    nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
    engine = [f'tmp_dir = "{tmp_dir}"'] if tmp_dir is not None else []
    if shutil.which("runc"):
        engine.append('runtime = "runc"')
    if not Path("/run/systemd/system").is_dir():
        engine += ['cgroup_manager = "cgroupfs"', 'events_logger = "file"']
    text = ("[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n" + "\n".join(engine) + "\n")
    path = directory / "containers.conf"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path
