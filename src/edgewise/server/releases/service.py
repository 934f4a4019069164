"""Releases: operator-signed bundles that become TUF targets and assignable releases.

Invariant: a Release row exists only for a bundle whose manifest and every listed file are
targets signed by the operator, with matching sha256 and size.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session
from tuf.api.metadata import Metadata, TargetFile, Targets

from ...artifacts import (
    MANIFEST_NAME,
    NAMED_KINDS,
    BundleError,
    BundleManifest,
    parse_manifest,
    satisfies,
)
from ...trust import DELTAS_ROLE, ReleaseTerms, ServerRepository, VerificationError
from .._errors import Conflict, InvalidInput, NotFound
from ..events import service as events
from .models import Release, ReleaseVariant

log = logging.getLogger("edgewise.server.releases")


def list_releases(session: Session) -> list[Release]:
    return list(session.scalars(select(Release).order_by(Release.created_at, Release.id)))


def get_release(session: Session, *, release_id: str) -> Release:
    release = session.get(Release, release_id)
    if release is None:
        raise NotFound(f"no release {release_id!r}")
    return release


def _signed_bundle(repo: ServerRepository, signed_targets: bytes,
                   uploads: list[BinaryIO], max_upload_bytes: int
                   ) -> tuple[str, BundleManifest, dict[str, TargetFile]]:
    """Store the uploads and check that the new targets metadata adds exactly one bundle,
    every file of it uploaded and signed with the manifest's hash and size; return the
    manifest's target path, the manifest and the added targets."""
    for stream in uploads:
        try:
            repo.store_object(stream, max_bytes=max_upload_bytes)
        except VerificationError as exc:
            raise InvalidInput(str(exc)) from exc
    try:
        new = Metadata[Targets].from_bytes(signed_targets).signed
    except Exception as exc:
        raise InvalidInput(f"targets metadata is malformed: {exc}") from exc
    current_bytes = repo.current_targets()
    current = Metadata[Targets].from_bytes(current_bytes).signed.targets if current_bytes else {}
    for path, info in current.items():
        if path not in new.targets or new.targets[path] != info:
            raise InvalidInput(f"the new targets metadata drops or changes existing target {path}")
    added = {p: t for p, t in new.targets.items() if p not in current}
    if not added:
        raise Conflict("nothing to publish: every file is already a published target "
                       "(this release already exists)")
    manifests = [p for p in added if p.rsplit("/", 1)[-1] == MANIFEST_NAME]
    if len(manifests) != 1:
        raise InvalidInput(
            f"a release adds exactly one {MANIFEST_NAME} target, got {len(manifests)}")
    manifest_path = manifests[0]
    try:
        terms = ReleaseTerms.of(added[manifest_path])
    except VerificationError as exc:
        raise InvalidInput(str(exc)) from exc
    if terms is None:
        raise InvalidInput(f"{manifest_path}: no signed release terms (counter, hardware); "
                           "devices would refuse it: sign with a current `edgewise publish`")
    prefix = manifest_path[: -len(MANIFEST_NAME)]
    manifest_obj = repo.object_path(added[manifest_path].hashes.get("sha256", ""))
    if manifest_obj is None:
        raise InvalidInput(f"{manifest_path}: its bytes were not uploaded")
    try:
        manifest = parse_manifest(manifest_obj.read_bytes())
    except BundleError as exc:
        raise InvalidInput(f"{manifest_path}: {exc}") from exc
    if prefix != f"{manifest.name}/{manifest.version}/":
        raise InvalidInput(f"{manifest_path}: path does not match {manifest.release_name}")
    expected = {prefix + rel: entry for rel, entry in manifest.files.items()}
    if set(added) - {manifest_path} != set(expected):
        raise InvalidInput("the signed targets do not match the files the manifest lists")
    for path, entry in expected.items():
        info = added[path]
        if info.hashes.get("sha256") != entry.sha256 or info.length != entry.size:
            raise InvalidInput(f"{path}: signed hash/size differ from the manifest")
    return manifest_path, manifest, added


def _check_dependencies(session: Session, manifest: BundleManifest) -> None:
    """Every release a bundle `depends` on must be satisfiable by a published release: a
    release no device could ever install is refused before it is signed into the repository."""
    for name, spec in sorted(manifest.depends.items()):
        published = sorted(session.scalars(select(Release.version).where(
            Release.name == name)))
        if not any(satisfies(version, spec) for version in published):
            have = ", ".join(f"{name}@{v}" for v in published) or "none"
            raise InvalidInput(f"{manifest.release_name} depends on {name} {spec}, and no "
                               f"published release satisfies it (published: {have}); "
                               f"publish a matching {name} first")


def _check_name_kind(session: Session, manifest: BundleManifest) -> None:
    """A release name is one component on every device: an app's or a config's name stays
    that kind (a config named like an app would replace the app on devices, and either named
    like a model would become a second component of that name)."""
    kind = manifest.kind
    for other in session.scalars(select(Release).where(Release.name == manifest.name)):
        theirs = (other.manifest or {}).get("kind", "image-classifier")
        if theirs != kind and (kind in NAMED_KINDS or theirs in NAMED_KINDS):
            raise InvalidInput(f"{manifest.release_name} is of kind {kind}, and "
                               f"{other.name}@{other.version} of kind {theirs}: a name "
                               "keeps its kind (a device runs one component per name); "
                               "choose another name")


def _publish_targets(repo: ServerRepository, signed_targets: bytes) -> int:
    try:
        return repo.publish(signed_targets).version
    except VerificationError as exc:
        raise InvalidInput(str(exc)) from exc


def publish(
    session: Session,
    *,
    repo: ServerRepository,
    signed_targets: bytes,
    uploads: list[BinaryIO],
    max_upload_bytes: int,
) -> Release:
    manifest_path, manifest, added = _signed_bundle(repo, signed_targets, uploads,
                                                    max_upload_bytes)
    if session.scalars(select(Release).where(Release.name == manifest.name,
                                             Release.version == manifest.version)).first():
        raise Conflict(f"release {manifest.release_name} already exists")
    _check_name_kind(session, manifest)
    _check_dependencies(session, manifest)
    version = _publish_targets(repo, signed_targets)
    release = Release(
        id=f"rel-{secrets.token_hex(5)}",
        name=manifest.name,
        version=manifest.version,
        manifest_target=manifest_path,
        targets_version=version,
        size_bytes=sum(t.length for t in added.values()),
        manifest=manifest.model_dump(mode="json"),
    )
    session.add(release)
    events.record(session, kind="published", release_id=release.id,
                  message=f"published {manifest.release_name} (targets v{version})")
    session.commit()
    release.deltas = make_deltas(session, repo=repo, release=release)
    session.commit()
    return release


def add_variant(
    session: Session,
    *,
    repo: ServerRepository,
    release_id: str,
    hardware: list[str],
    signed_targets: bytes,
    uploads: list[BinaryIO],
    max_upload_bytes: int,
) -> list[ReleaseVariant]:
    """Publish another build of `release_id` (same model name, its own version, e.g.
    1.2.0+int8-static) that devices of the given hardware install instead."""
    release = get_release(session, release_id=release_id)
    hardware = sorted({h.strip() for h in hardware if h.strip()})
    if not hardware:
        raise InvalidInput("name at least one hardware id for the variant")
    taken = [h for h in hardware if session.get(ReleaseVariant, (release.id, h)) is not None]
    if taken:
        raise Conflict(f"{release.id} already has a variant for {', '.join(taken)}")
    manifest_path, manifest, added = _signed_bundle(repo, signed_targets, uploads,
                                                    max_upload_bytes)
    if manifest.name != release.name:
        raise InvalidInput(f"a variant of {release.name}@{release.version} must carry the "
                           f"model name {release.name!r}, not {manifest.name!r}")
    kind = release.manifest.get("kind", "image-classifier")
    if manifest.kind != kind:
        raise InvalidInput(f"a variant of {release.name}@{release.version} must be a {kind} "
                           f"bundle, not a {manifest.kind} one")
    if isinstance(manifest, BundleManifest) and \
            list(manifest.labels) != list(release.manifest.get("labels") or []):
        raise InvalidInput("a variant must predict the same labels as its release")
    terms = ReleaseTerms.of(added[manifest_path])
    base_info = repo.target(release.manifest_target)
    base = ReleaseTerms.of(base_info) if base_info is not None else None
    if base is None or terms.counter != base.counter or set(terms.hardware_ids) != set(hardware):
        raise InvalidInput(f"a variant is signed with its release's counter "
                           f"({base.counter if base else '?'}) and for exactly the hardware "
                           f"{hardware}; got counter {terms.counter}, hardware "
                           f"{list(terms.hardware_ids)}")
    _publish_targets(repo, signed_targets)
    size = sum(t.length for t in added.values())
    rows = [ReleaseVariant(release_id=release.id, hardware=h, version=manifest.version,
                           manifest_target=manifest_path, size_bytes=size,
                           manifest=manifest.model_dump(mode="json")) for h in hardware]
    session.add_all(rows)
    events.record(session, kind="variant-published", release_id=release.id,
                  message=f"{manifest.release_name} for hardware {', '.join(hardware)} "
                  f"({size} bytes, release {release.name}@{release.version})")
    session.commit()
    return rows


def variants(session: Session, *, release_id: str) -> list[ReleaseVariant]:
    return list(session.scalars(select(ReleaseVariant).where(
        ReleaseVariant.release_id == release_id).order_by(ReleaseVariant.hardware)))


def build_for(session: Session, *, release: Release, hardware: str | None
              ) -> Release | ReleaseVariant:
    """What a device of `hardware` installs for `release`: its variant, else the release."""
    if hardware:
        variant = session.get(ReleaseVariant, (release.id, hardware))
        if variant is not None:
            return variant
    return release


def llm_models(session: Session) -> dict[str, list[tuple[Release, str, int]]]:
    """The GGUF files LLM releases ship on this server: sha256 -> [(release, version, size)],
    oldest first (a variant is listed under its release, with its own version)."""
    found: dict[str, list[tuple[Release, str, int]]] = {}
    rows = [(r, r.version, r.manifest) for r in list_releases(session)]
    rows += [(session.get(Release, v.release_id), v.version, v.manifest) for v in
             session.scalars(select(ReleaseVariant).order_by(ReleaseVariant.created_at))]
    for release, version, manifest in rows:
        entry = (manifest.get("files") or {}).get((manifest.get("llm") or {}).get("model"))
        if manifest.get("kind") == "llm" and entry:
            found.setdefault(entry["sha256"], []).append((release, version, entry["size"]))
    return found


def adapter_base(release: Release, models: dict[str, list[tuple[Release, str, int]]]
                 ) -> dict[str, Any] | None:
    """For an LLM adapter release: the base it applies to, found on this server by its GGUF's
    sha256 (the release the adapter names when several ship that file), and what the device
    downloads against what shipping the fine-tune as a full model would cost (the base's GGUF
    size: a merged model is as large; from the adapter's build record when the base is not
    a release here). None for any other release."""
    manifest = release.manifest or {}
    spec = manifest.get("adapter")
    if manifest.get("kind") != "llm-adapter" or not isinstance(spec, dict):
        return None
    candidates = models.get(spec["base_sha256"], [])
    named = [c for c in candidates if f"{c[0].name}@{c[1]}" == spec["base_release"]]
    base, version, size = (named or candidates or [(None, None, None)])[0]
    if size is None:
        recorded = (spec.get("reference") or {}).get("base_gguf_bytes")
        size = recorded if type(recorded) is int and recorded > 0 else None
    adapter_file = (manifest.get("files") or {}).get(spec["adapter"]) or {}
    return {"base_release": spec["base_release"], "base_sha256": spec["base_sha256"],
            "base_release_id": base.id if base else None,
            "base_name": base.name if base else None, "base_version": version,
            "rank": spec["rank"], "alpha": spec["alpha"],
            "adapter_bytes": adapter_file.get("size", 0), "release_bytes": release.size_bytes,
            "full_model_bytes": size}


MIN_DELTA_FILE_BYTES = 64 << 10  # below this a delta is not worth a second round trip


def readable_delta_version(status: dict[str, Any] | None) -> int:
    """The newest delta format this server writes that a device said it reads; 1 for agents
    that never said (they predate the report field, and every agent reads version 1)."""
    from ...artifacts.delta import READABLE_VERSIONS

    said = (status or {}).get("delta_versions") or []
    return max((v for v in said if v in READABLE_VERSIONS), default=1)


def delta_target_path(result_sha256: str, base_sha256: str) -> str:
    return f"{DELTAS_ROLE}/{result_sha256}.{base_sha256}"


def make_deltas(session: Session, *, repo: ServerRepository, release: Release
                ) -> list[dict[str, Any]]:
    """Delta patches to `release` from every release devices actually run (their reports),
    published as targets of the online `deltas` role, each in the newest format that every
    device on its base reads. Best effort: a failure here only means devices download full
    files."""
    from ...artifacts.delta import FORMAT_VERSION, DeltaError, encode_delta
    from ..devices.models import Device

    # base release -> the newest patch format all of its devices read
    bases: dict[str, int] = {}
    for base_id, status in session.execute(select(Device.release_id, Device.status).where(
            Device.release_id.is_not(None), Device.release_id != release.id,
            Device.revoked_at.is_(None))):
        bases[base_id] = min(bases.get(base_id, FORMAT_VERSION), readable_delta_version(status))
    made: list[dict[str, Any]] = []
    add: dict[str, TargetFile] = {}
    # Lowest version first: a patch two bases share (same old file) suits all their devices.
    for base_id, version in sorted(bases.items(), key=lambda kv: (kv[1], kv[0])):
        base = session.get(Release, base_id)
        if base is None:
            continue
        base_files = base.manifest.get("files", {})
        for rel, entry in release.manifest["files"].items():
            old = base_files.get(rel)
            if old is None or old["sha256"] == entry["sha256"] or \
                    entry["size"] < MIN_DELTA_FILE_BYTES:
                continue
            path = delta_target_path(entry["sha256"], old["sha256"])
            if path in add:
                continue
            old_obj, new_obj = repo.object_path(old["sha256"]), repo.object_path(entry["sha256"])
            if old_obj is None or new_obj is None:
                continue
            with tempfile.TemporaryDirectory(dir=repo.dir) as tmp:
                patch = Path(tmp) / "patch"
                try:
                    info = encode_delta(old_obj, new_obj, patch, max_version=version)
                except (DeltaError, OSError) as exc:
                    log.warning("no delta %s -> %s for %s: %s", base.id, release.id, rel, exc)
                    continue
                if info.patch_size >= 0.9 * entry["size"]:
                    continue  # not worth it: devices take the full file
                with open(patch, "rb") as f:
                    sha, size = repo.store_object(f, max_bytes=entry["size"])
            add[path] = TargetFile(length=size, hashes={"sha256": sha}, path=path,
                                   unrecognized_fields={"custom": {
                                       "base_sha256": old["sha256"],
                                       "result_sha256": entry["sha256"],
                                       "result_length": entry["size"],
                                       "file": rel, "base_release_id": base.id,
                                       "release_id": release.id,
                                       "format_version": info.version}})
            made.append({"base_release_id": base.id, "file": rel, "delta_bytes": size,
                         "full_bytes": entry["size"], "format_version": info.version})
    if add:
        repo.publish_deltas(add)
        events.record(session, kind="deltas-published", release_id=release.id,
                      message=", ".join(f"{m['file']} from {m['base_release_id']}: "
                                        f"{m['delta_bytes']}/{m['full_bytes']} bytes"
                                        for m in made))
    return made
