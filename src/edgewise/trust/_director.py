"""The Uptane-style director: per-device TUF metadata, signed online, saying exactly which
bundles that device must install (one per component: its model, each of its apps).

The image repository (`_repository`, targets signed offline by the publisher) says what
exists and what it may replace (release terms, `_terms`). The director repository says, for
one device, which of those it must install now: a targets role listing that device's bundle
manifest with its length and hashes, and custom fields binding it to the device id, its
hardware id and the release counter. Each device runs a second TUF updater against its own
director metadata (root provisioned at enrollment; timestamp -> snapshot -> targets, versions
only ever grow), and installs only when the director and the image repository agree
(`check_director`).

The director's key is online (it signs whenever an assignment changes), so a stolen server can
sign any instruction: it can then delay updates or choose among releases the image repository
permits, but never make a device install something the offline key did not sign, downgrade it,
or cross hardware.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from ._errors import KeyFileError, VerificationError
from ._keys import load_signer, write_private
from ._repository import _atomic_write
from ._terms import ReleaseTerms

__all__ = ["DIRECTOR_FIELD", "DirectorMetadata", "DirectorRepository", "check_director"]

DIRECTOR_FIELD = "edgewise_director"
ROOT_EXPIRY = timedelta(days=3650)  # re-keying the director means re-enrolling devices
TARGETS_EXPIRY = timedelta(days=7)
TIMESTAMP_EXPIRY = timedelta(days=1)


@dataclass(frozen=True)
class DirectorMetadata:
    version: int
    targets: bytes
    snapshot: bytes
    timestamp: bytes
    expires: datetime  # the earliest expiry among the three (naive UTC)


class DirectorRepository:
    """The director's key and root (files under `directory`) and per-device signing."""

    def __init__(self, directory: Path | str, *, create: bool = True) -> None:
        """`create=False`: the key must exist (devices trust its root already; a new key
        would cut every enrolled device off from updates)."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        key_path, root_path = self.dir / "director.pem", self.dir / "1.root.json"
        if not key_path.exists():
            if not create:
                raise KeyFileError(f"the director key {key_path} is missing but devices are "
                                   "enrolled: restore it from a backup (a new key would cut "
                                   "every device off from updates), or re-enroll the fleet")
            write_private(key_path, CryptoSigner.generate_ed25519())
            root_path.unlink(missing_ok=True)
        self._signer = load_signer(key_path)
        if not root_path.exists():
            root = Root(expires=datetime.now(UTC).replace(microsecond=0) + ROOT_EXPIRY,
                        consistent_snapshot=False)
            for role in (Root.type, Targets.type, Snapshot.type, Timestamp.type):
                root.add_key(self._signer.public_key, role)
            md = Metadata(root)
            md.sign(self._signer)
            _atomic_write(root_path, md.to_bytes())
        self.root = root_path.read_bytes()

    def sign(self, *, device_id: str, version: int, targets: dict[str, TargetFile],
             now: datetime | None = None) -> DirectorMetadata:
        """Targets, snapshot and timestamp for one device at `version` (all three share it)."""
        now = (now or datetime.now(UTC)).replace(microsecond=0)
        t = Targets(version=version, expires=now + TARGETS_EXPIRY, targets=dict(targets),
                    unrecognized_fields={"device_id": device_id})
        s = Snapshot(version=version, expires=now + TARGETS_EXPIRY,
                     meta={"targets.json": MetaFile(version)})
        ts = Timestamp(version=version, expires=now + TIMESTAMP_EXPIRY,
                       snapshot_meta=MetaFile(version))
        out = []
        for signed in (t, s, ts):
            md = Metadata(signed)
            md.sign(self._signer)
            out.append(md.to_bytes())
        return DirectorMetadata(version, *out,
                                expires=(now + TIMESTAMP_EXPIRY).replace(tzinfo=None))

    @staticmethod
    def instruction(path: str, image: TargetFile, *, device_id: str, hardware: str,
                    release_id: str) -> TargetFile:
        """The director's entry for one device: the image repository's length and hashes,
        bound to the device, its hardware and the release counter the image signed."""
        terms = ReleaseTerms.of(image)
        if terms is None:
            raise VerificationError(f"{path} has no signed release terms")
        return TargetFile(image.length, dict(image.hashes), path, unrecognized_fields={
            "custom": {DIRECTOR_FIELD: {"device_id": device_id, "hardware_id": hardware,
                                        "release_counter": terms.counter,
                                        "release_id": release_id}}})


def check_director(director: TargetFile, image: TargetFile, *, device_id: str,
                   hardware: str) -> None:
    """Raise VerificationError unless the director's instruction and the image repository's
    target agree on path, length, hashes and release counter, and the instruction is for this
    device and its hardware."""
    raw = (director.custom or {}).get(DIRECTOR_FIELD) if isinstance(director.custom,
                                                                     dict) else None
    if not isinstance(raw, dict):
        raise VerificationError(f"director entry for {director.path} has no device binding")
    terms = ReleaseTerms.of(image)
    problems = []
    if director.path != image.path:
        problems.append(f"path {director.path} vs {image.path}")
    if director.length != image.length or director.hashes != image.hashes:
        problems.append("length or hashes differ")
    if raw.get("device_id") != device_id:
        problems.append(f"instruction is for device {raw.get('device_id')!r}")
    if raw.get("hardware_id") != hardware:
        problems.append(f"instruction is for hardware {raw.get('hardware_id')!r}")
    if terms is None or raw.get("release_counter") != terms.counter:
        problems.append(f"release counter {raw.get('release_counter')!r} vs the image's "
                        f"{terms.counter if terms else None}")
    if problems:
        raise VerificationError(f"director and image repository disagree on {image.path}: "
                                + "; ".join(problems))
