"""Configuration files on the device: the config backend of the component runtime seam.

Invariant: a set of configuration files becomes visible at one stable path,
`STATE/config/NAME/current`, a symlink to the component's active slot that is only ever
replaced atomically (a new link renamed over it), so a reader sees the old files or the new
ones, never a mix; files are checked (their declared formats, then the manifest's command)
while still in the inactive slot, so files that fail their own checks never become current.
The app that reads them (`ConfigSpec.app`) sees the current files read-only inside its
container (`mounts_for`: the container engine asks when it starts the app), is restarted
when they change, and its health check is theirs. Nothing here decides what comes next: the
state machine does.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from ..artifacts import (
    AppManifest,
    BundleError,
    ConfigManifest,
    check_config_formats,
    read_manifest,
)
from ._errors import HealthCheckFailed, UpdateRejected
from ._runtime import ComponentRuntime, HealthReport

__all__ = ["ConfigInvalid", "ConfigRuntime", "current_link", "mounts_for"]

log = logging.getLogger("edgewise.agent")

# The app component a config names -> (its committed slot, its manifest), or None when the
# device does not run it: the agent's answer, from its record.
CommittedApp = Callable[[str], "tuple[Path, AppManifest] | None"]


class ConfigInvalid(UpdateRejected):
    """The files fail the checks their own manifest declares: this release never installs."""


def current_link(root: Path, name: str) -> Path:
    """The stable path of config `name`'s active files (documented for the device's apps)."""
    return Path(root) / name / "current"


def mounts_for(root: Path, app: str) -> list[tuple[Path, str]]:
    """(host directory, path in the container) of every current config that `app` reads."""
    mounts = []
    root = Path(root)
    if not root.is_dir():
        return mounts
    for link in sorted(root.glob("*/current")):
        try:
            manifest = read_manifest(link)
        except (BundleError, OSError):
            continue
        if isinstance(manifest, ConfigManifest) and manifest.config.app == app:
            mounts.append((link.resolve(), manifest.mount))
    return mounts


def _point(link: Path, target: Path | None) -> None:
    """Make `link` point at `target` (None: remove it), atomically: a new link renamed over
    the old one, then the directory synced."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if target is None:
        link.unlink(missing_ok=True)
    else:
        tmp = link.with_name(f".{link.name}.new")
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, link.parent), tmp)
        os.replace(tmp, link)
    fd = os.open(link.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ConfigRuntime(ComponentRuntime):
    """The component runtime of config bundles. `containers` restarts and probes the app that
    reads the files (`_containers.ContainerRuntime`), found through `committed_app`."""

    def __init__(self, root: Path, *, containers, committed_app: CommittedApp) -> None:
        self.root = Path(root)
        self.containers = containers
        self.committed_app = committed_app

    def stage(self, slot_dir: Path, manifest: ConfigManifest, *, keep: list) -> None:
        """Check the files in the inactive slot: formats, then the manifest's command."""
        try:
            check_config_formats(slot_dir, manifest)
        except (BundleError, OSError) as exc:
            raise ConfigInvalid(f"{manifest.release_name} is invalid: {exc}") from exc
        check = manifest.config.check
        if check is None:
            return
        try:
            proc = subprocess.run(list(check.command), cwd=slot_dir, capture_output=True,
                                  text=True, timeout=check.timeout_s,
                                  env={**os.environ, "EDGEWISE_CONFIG_DIR": str(slot_dir)})
        except subprocess.TimeoutExpired as exc:
            raise ConfigInvalid(f"{manifest.release_name} is invalid: its check "
                                f"{' '.join(check.command)!r} took over {check.timeout_s:g} s"
                                ) from exc
        except OSError as exc:
            raise ConfigInvalid(f"{manifest.release_name}: its check "
                                f"{' '.join(check.command)!r} cannot run here: {exc}") from exc
        if proc.returncode != 0:
            said = " ".join((proc.stderr or proc.stdout).split())[-300:]
            raise ConfigInvalid(f"{manifest.release_name} is invalid: its check "
                                f"{' '.join(check.command)!r} exited {proc.returncode}"
                                + (f": {said}" if said else ""))

    def activate(self, slot_dir: Path, manifest: ConfigManifest) -> None:
        _point(current_link(self.root, manifest.name), Path(slot_dir))
        self._restart_app(manifest)

    def stop(self, slot_dir: Path, manifest: ConfigManifest) -> None:
        """No files of this config are current any more; its app runs without them."""
        link = current_link(self.root, manifest.name)
        if link.is_symlink() and link.resolve() != Path(slot_dir).resolve():
            return  # another slot is current (already rolled forward or back)
        _point(link, None)  # (again after a power cut: then only the app restarts)
        self._restart_app(manifest)

    def _restart_app(self, manifest: ConfigManifest) -> None:
        app = manifest.config.app and self.committed_app(manifest.config.app)
        if app:
            # Re-created with the current files mounted (the engine asks `mounts_for`).
            self.containers.activate(*app)

    def health_check(self, slot_dir: Path, manifest: ConfigManifest) -> HealthReport:
        """The current link names this slot and its files still parse; then the health check
        of the app that reads them, restarted with them."""
        link = current_link(self.root, manifest.name)
        if not link.is_symlink() or link.resolve() != Path(slot_dir).resolve():
            raise HealthCheckFailed(f"{link} does not point at the new files")
        try:
            check_config_formats(link, manifest)
        except (BundleError, OSError) as exc:
            raise HealthCheckFailed(f"the current files are unreadable: {exc}") from exc
        extra = {"files": len(manifest.files), "path": str(link)}
        name = manifest.config.app
        app = name and self.committed_app(name)
        if not app:
            reason = "ok" if name is None else f"ok (app {name} does not run on this device)"
            return HealthReport(True, 0.0, 1.0, 0.0, reason, extra=extra)
        report = self.containers.health_check(*app)
        reason = report.reason if report.passed else f"app {name}: {report.reason}"
        return HealthReport(report.passed, 0.0, report.top1_agreement, report.p95_latency_ms,
                            reason, extra={**report.extra, **extra, "app": name})
