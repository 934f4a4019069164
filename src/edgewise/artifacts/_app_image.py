"""App bundles from container images: `edgewise app import` (an OCI or Docker archive) and
`edgewise app build` (a Containerfile), through skopeo and podman.

Invariant: the bundle directory appears only complete and validated (`write_app_bundle`);
an archive skopeo cannot read, or a build that fails, leaves nothing behind.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from ._errors import BundleError
from ._manifest import AppManifest
from ._oci import PodmanStore, containers_conf, write_app_bundle

__all__ = ["archive_format", "build_app", "import_app"]

_TIMEOUT_S = 1800


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BundleError(f"{name} is not installed (apt-get install podman runc skopeo)")
    return path


def _tag(version: str) -> str:
    return version.replace("+", "_")


def archive_format(archive: Path) -> str:
    """skopeo's transport for an image archive: `oci-archive` or `docker-archive`."""
    try:
        with tarfile.open(archive) as tar:
            names = {n.removeprefix("./") for n in tar.getnames()}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{archive}: not a readable tar archive ({exc})") from exc
    if "oci-layout" in names and "index.json" in names:
        return "oci-archive"
    if "manifest.json" in names:
        return "docker-archive"
    raise BundleError(f"{archive}: neither an OCI image archive (oci-layout, index.json) nor a "
                      "Docker archive (manifest.json)")


def _skopeo_copy(src: str, dest: str, env: dict[str, str] | None = None) -> None:
    import os

    proc = subprocess.run([_tool("skopeo"), "copy", "--quiet", src, dest], capture_output=True,
                          text=True, timeout=_TIMEOUT_S, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise BundleError(f"skopeo cannot copy {src}: {proc.stderr.strip()[-800:]}")


def import_app(archive: Path, out_dir: Path, *, name: str, version: str, app: dict[str, Any],
               depends: dict[str, str] | None = None) -> AppManifest:
    """An app bundle from an image archive (`podman save`, `docker save`, `skopeo copy ...
    oci-archive:`); `app` is the manifest's app section without ref and digest."""
    archive, out_dir = Path(archive), Path(out_dir)
    if out_dir.exists():
        raise BundleError(f"{out_dir} already exists: give a new directory")
    fmt = archive_format(archive)
    with tempfile.TemporaryDirectory(prefix="edgewise-import-") as tmp:
        layout = Path(tmp) / "layout"
        _skopeo_copy(f"{fmt}:{archive}", f"oci:{layout}:{_tag(version)}")
        return write_app_bundle(out_dir, layout, name=name, version=version, app=app,
                                ref=_tag(version),
                                provenance={"source": archive.name, "format": fmt},
                                depends=depends)


def build_app(context: Path, out_dir: Path, *, name: str, version: str, app: dict[str, Any],
              containerfile: Path | None = None, storage: Path | None = None,
              depends: dict[str, str] | None = None) -> AppManifest:
    """`podman build` of a Containerfile, then an app bundle of the image. `storage`: podman's
    store for the build (default: the user's own, where local base images are)."""
    import os

    context, out_dir = Path(context), Path(out_dir)
    if out_dir.exists():
        raise BundleError(f"{out_dir} already exists: give a new directory")
    if not context.is_dir():
        raise BundleError(f"{context}: not a directory")
    file = containerfile or next((context / f for f in ("Containerfile", "Dockerfile")
                                  if (context / f).is_file()), None)
    if file is None or not Path(file).is_file():
        raise BundleError(f"{context}: no Containerfile or Dockerfile")
    image = f"localhost/edgewise-build/{name}:{_tag(version)}"
    with tempfile.TemporaryDirectory(prefix="edgewise-build-") as tmp:
        argv, source, env = [_tool("podman")], f"containers-storage:{image}", {}
        if storage is not None:
            store = PodmanStore(Path(storage))
            argv += store.podman_args()
            source = store.skopeo_ref(image)
            env = store.env()
        elif "CONTAINERS_CONF" not in os.environ:  # RUN steps need runc + lower ulimits here
            env["CONTAINERS_CONF"] = str(containers_conf(Path(tmp)))
        proc = subprocess.run([*argv, "build", "-q", "-f", str(file), "-t", image, str(context)],
                              capture_output=True, text=True, timeout=_TIMEOUT_S,
                              env={**os.environ, **env})
        if proc.returncode != 0:
            raise BundleError(f"podman build failed: {proc.stderr.strip()[-1500:]}")
        layout = Path(tmp) / "layout"
        _skopeo_copy(source, f"oci:{layout}:{_tag(version)}", env)
        return write_app_bundle(out_dir, layout, name=name, version=version, app=app,
                                ref=_tag(version),
                                provenance={"source": "podman build", "image": image},
                                depends=depends)
