"""Configuration-file bundles: writing one from files, and the format checks every reader runs.

Invariant: a config bundle on disk holds exactly its files, each parsing as the format its
manifest declares (`check_config_formats`, run at build, at verification on the device and
again before the files become active), so a file that cannot be read never reaches an app.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._errors import BundleError
from ._manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ConfigManifest,
    ConfigSpec,
    FileEntry,
    check_relative_path,
)

__all__ = ["check_config_formats", "default_format", "write_config_bundle"]

_MAX_FILE_BYTES = 64 << 20  # configuration, not data: a bigger file is a mistake


def default_format(path: str) -> str | None:
    """The check a file gets when none is given: by its suffix (.json, .toml), else none."""
    suffix = Path(path).suffix.lower()
    return {".json": "json", ".toml": "toml"}.get(suffix)


def check_config_formats(directory: Path, manifest: ConfigManifest) -> None:
    """Every file with a declared format parses as it; `BundleError` naming the file and the
    parser's words otherwise."""
    for rel, fmt in sorted(manifest.config.formats.items()):
        data = (Path(directory) / rel).read_bytes()
        try:
            text = data.decode("utf-8")
            if fmt == "json":
                json.loads(text)
            elif fmt == "toml":
                tomllib.loads(text)
        except UnicodeDecodeError as exc:
            raise BundleError(f"{rel}: not UTF-8 text ({exc.reason} at byte {exc.start}), "
                              f"but its format is {fmt}") from exc
        except json.JSONDecodeError as exc:
            raise BundleError(f"{rel}: invalid JSON: {exc.msg} (line {exc.lineno}, column "
                              f"{exc.colno})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise BundleError(f"{rel}: invalid TOML: {exc}") from exc


def _collect(files: Mapping[str, Path] | list[Path | str]) -> dict[str, Path]:
    """Bundle path -> source file. A list names files (by their own name) and directories
    (their files, by path inside them); a mapping names each file explicitly."""
    found: dict[str, Path] = {}
    if isinstance(files, Mapping):
        items = [(name, Path(src)) for name, src in files.items()]
    else:
        items = []
        for src in map(Path, files):
            if src.is_dir():
                items += [(p.relative_to(src).as_posix(), p)
                          for p in sorted(src.rglob("*")) if not p.is_dir()]
            else:
                items.append((src.name, src))
    for name, src in items:
        check_relative_path(name)
        if name in found:
            raise BundleError(f"{name}: given twice ({found[name]} and {src})")
        if src.is_symlink() or not src.is_file():
            raise BundleError(f"{src}: not a regular file" if src.exists() or src.is_symlink()
                              else f"{src}: no such file")
        if src.stat().st_size > _MAX_FILE_BYTES:
            raise BundleError(f"{src}: {src.stat().st_size} bytes; configuration files are at "
                              f"most {_MAX_FILE_BYTES >> 20} MB")
        found[name] = src
    if not found:
        raise BundleError("no files given: a config bundle holds at least one file")
    return found


def write_config_bundle(out_dir: Path, files: Mapping[str, Path] | list[Path | str], *,
                        name: str, version: str, formats: Mapping[str, str] | None = None,
                        check: Mapping[str, Any] | None = None, app: str | None = None,
                        mount: str | None = None, depends: Mapping[str, str] | None = None,
                        provenance: Mapping[str, Any] | None = None) -> ConfigManifest:
    """Write a config bundle of `files` (see `_collect`). Files named .json and .toml are
    checked as such unless `formats` says otherwise (`formats` adds or overrides: path ->
    json, toml or text). `check` is `{"command": [...], "timeout_s": N}` (`ConfigCheck`);
    `app` the app component that reads the files. Validated; `out_dir` must not exist yet,
    and a failure leaves nothing behind."""
    from ._bundle import file_sha256, validate_bundle

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise BundleError(f"{out_dir} already exists: give a new directory")
    sources = _collect(files)
    declared = {rel: fmt for rel in sources if (fmt := default_format(rel)) is not None}
    for rel, fmt in (formats or {}).items():
        if rel not in sources:
            raise BundleError(f"format for {rel!r}: no such file in the bundle (files: "
                              f"{', '.join(sorted(sources))})")
        declared[rel] = fmt
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        entries = {}
        for rel, src in sorted(sources.items()):
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            sha, size = file_sha256(dest)
            entries[rel] = FileEntry(sha256=sha, size=size)
        try:
            manifest = ConfigManifest(
                format_version=FORMAT_VERSION, name=name, version=version, files=entries,
                config=ConfigSpec.model_validate({"formats": declared, "check": check,
                                                  "app": app, "mount": mount}),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                provenance=dict(provenance or {}), depends=dict(depends or {}),
                requires=("config-file", "depends") if depends else ("config-file",))
        except ValueError as exc:
            raise BundleError(f"invalid config bundle: {exc}") from exc
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        validate_bundle(staging)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
