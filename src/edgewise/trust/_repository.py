"""Server side of the TUF repository: accept operator-signed targets, sign snapshot/timestamp.

Invariant: the server never signs targets. It publishes targets metadata only if it verifies
against the trusted root, has a higher version than the current one and every target's bytes
are in the content-addressed object store; then it writes, in this order, the targets, a new
snapshot and a new timestamp (each file replaced atomically), so a client never sees a
timestamp that points at metadata which is not there yet.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO, Protocol

from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from ._errors import KeyFileError, VerificationError

__all__ = ["ServerRepository"]

_SERVED_FILES = 64  # versioned metadata files kept in memory for serving
_SERVED_MAX_BYTES = 4 << 20  # larger ones are read from disk at each request
_METADATA_NAME = re.compile(r"^(?:(\d+)\.)?(root|targets|snapshot|timestamp|deltas)\.json$")
DELTAS = "deltas"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RemoteObjects(Protocol):
    """An object store beside the local objects directory (`server.storage.S3Objects`)."""

    def put(self, sha256: str, path: Path) -> None: ...
    def fetch(self, sha256: str, dest: Path) -> bool: ...
    def url(self, sha256: str) -> str: ...


class ServerRepository:
    def __init__(
        self,
        directory: Path | str,
        *,
        root: bytes,
        online_signer: Signer,
        timestamp_expiry: timedelta = timedelta(days=1),
        snapshot_expiry: timedelta = timedelta(days=7),
        remote: RemoteObjects | None = None,
        serialize: Callable[[], AbstractContextManager[object]] | None = None,
    ) -> None:
        self.dir = Path(directory)
        # An object store that holds every object too (`server.storage`): the local
        # directory is then a cache, filled again from the store on demand.
        self.remote = remote
        self.metadata_dir = self.dir / "metadata"
        self.objects_dir = self.dir / "objects"
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # Several server processes may share this directory (replicas): `serialize` is their
        # common lock (a PostgreSQL advisory lock, or a file lock on one host), held around
        # every write of metadata, so versions follow one another whoever signs them.
        self._serialize = serialize
        self._write_depth = 0
        # Versioned metadata files as served (bytes, ETag), newest last; and, keyed by the
        # timestamp file's bytes (re-read each time: another replica may replace it), the
        # online roles' expiry times and the current targets and delta targets.
        self._cache_lock = threading.Lock()
        self._served: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._expiry: tuple[bytes, datetime, datetime] | None = None
        self._signed_targets: tuple[bytes, dict[str, TargetFile],
                                    dict[str, TargetFile]] | None = None
        self._signer = online_signer
        self._timestamp_expiry = timestamp_expiry
        self._snapshot_expiry = snapshot_expiry

        root_md = Metadata[Root].from_bytes(root)
        existing = self._latest_root()
        if existing is not None and existing.signed.version > root_md.signed.version:
            root_md = existing
        self.root = root_md
        keyid = online_signer.public_key.keyid
        for role in (Snapshot.type, Timestamp.type):
            if keyid not in root_md.signed.roles[role].keyids:
                raise KeyFileError(f"the online key is not a {role} key of the trusted root")
        with self._writing():
            name = self.metadata_dir / f"{root_md.signed.version}.root.json"
            if not name.exists():
                _atomic_write(name, root_md.to_bytes())
            self._resign_if_online_key_changed()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """This thread may write metadata: the process's lock, then (outermost only) the lock
        shared with other processes; then the newest root on disk, which another process
        may have added since."""
        with self._lock:
            self._write_depth += 1
            try:
                if self._write_depth > 1 or self._serialize is None:
                    yield
                    return
                with self._serialize():
                    latest = self._latest_root()
                    if latest is not None and latest.signed.version > self.root.signed.version:
                        self.root = latest
                    yield
            finally:
                self._write_depth -= 1

    def _resign_if_online_key_changed(self) -> None:
        """After an online-key rotation the server restarts with the new key: snapshot and
        timestamp signed by the retired key would be refused by devices, so sign them anew."""
        ts = self._timestamp()
        if ts is None:
            return
        try:
            self.root.signed.verify_delegate(Timestamp.type, ts.signed_bytes, ts.signatures)
        except UnsignedMetadataError:
            snap = self._snapshot()
            deltas = snap.signed.meta.get(f"{DELTAS}.json") if snap else None
            self._sign_snapshot_and_timestamp(snap.signed.meta["targets.json"].version,
                                              datetime.now(UTC),
                                              deltas_version=deltas.version if deltas else None)

    def add_root(self, new_root: bytes) -> Root:
        """Accept the next root version: signed by a threshold of the current root keys and
        of its own. Every version stays on disk, because devices walk the chain."""
        try:
            md = Metadata[Root].from_bytes(new_root)
        except Exception as exc:
            raise VerificationError(f"root metadata is malformed: {exc}") from exc
        if not isinstance(md.signed, Root):
            raise VerificationError(f"expected root metadata, got {md.signed.type}")
        with self._writing():
            if md.signed.version != self.root.signed.version + 1:
                raise VerificationError(f"root version {md.signed.version} does not follow "
                                        f"{self.root.signed.version}")
            for signer_root, who in ((self.root, "current"), (md, "new")):
                try:
                    signer_root.signed.verify_delegate(Root.type, md.signed_bytes,
                                                       md.signatures)
                except UnsignedMetadataError as exc:
                    raise VerificationError(
                        f"new root is not signed by a threshold of the {who} root keys") from exc
            _atomic_write(self.metadata_dir / f"{md.signed.version}.root.json", new_root)
            self.root = md
            return md.signed

    # ---- reading -------------------------------------------------------------------------

    def _latest_root(self) -> Metadata[Root] | None:
        versions = sorted(int(m.group(1)) for p in self.metadata_dir.iterdir()
                          if (m := _METADATA_NAME.match(p.name)) and m.group(2) == "root"
                          and m.group(1))
        if not versions:
            return None
        latest = self.metadata_dir / f"{versions[-1]}.root.json"
        return Metadata[Root].from_bytes(latest.read_bytes())

    def metadata_file(self, filename: str) -> Path | None:
        """Path of a metadata file a client asked for, or None (also for unsafe names)."""
        if not _METADATA_NAME.match(filename):
            return None
        if filename == "root.json":
            filename = f"{self.root.signed.version}.root.json"
        path = self.metadata_dir / filename
        return path if path.is_file() else None

    def metadata_bytes(self, filename: str) -> tuple[bytes, str] | None:
        """A metadata file's bytes and an ETag for them (None: no such file). Versioned files
        (N.role.json) never change once written: they are kept in memory by name; the
        others (timestamp.json) are read at every request (~1 kB), so a file another
        replica replaced is served at once, whatever the file system caches."""
        path = self.metadata_file(filename)
        if path is None:
            return None
        versioned = path.name[:1].isdigit()
        if versioned:
            with self._cache_lock:
                hit = self._served.get(path.name)
                if hit is not None:
                    self._served.move_to_end(path.name)
                    return hit
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        served = (data, f'"{hashlib.sha256(data).hexdigest()[:32]}"')
        if versioned and len(data) <= _SERVED_MAX_BYTES:
            with self._cache_lock:
                self._served[path.name] = served
                while len(self._served) > _SERVED_FILES:
                    self._served.popitem(last=False)
        return served

    def _timestamp_bytes(self) -> bytes | None:
        try:
            return (self.metadata_dir / "timestamp.json").read_bytes()
        except FileNotFoundError:
            return None

    def _timestamp(self) -> Metadata[Timestamp] | None:
        path = self.metadata_dir / "timestamp.json"
        return Metadata[Timestamp].from_bytes(path.read_bytes()) if path.exists() else None

    def current_targets(self) -> bytes | None:
        with self._lock:
            ts = self._timestamp()
            if ts is None:
                return None
            snap_version = ts.signed.snapshot_meta.version
            snap = Metadata[Snapshot].from_bytes(
                (self.metadata_dir / f"{snap_version}.snapshot.json").read_bytes())
            version = snap.signed.meta["targets.json"].version
            return (self.metadata_dir / f"{version}.targets.json").read_bytes()

    def target(self, path: str) -> TargetFile | None:
        """The signed info of a current target (or delta target), None if there is none.
        Both roles' targets are parsed once per timestamp: a new targets or deltas version
        always comes with a new snapshot and so a new timestamp."""
        key = self._timestamp_bytes()
        if key is None:
            return None
        with self._cache_lock:
            cached = self._signed_targets
        if cached is None or cached[0] != key:
            with self._lock:
                current = self.current_targets()
                deltas = self._current_deltas()
            # Parsed from the files as they are now, kept under the timestamp read before:
            # if one changed in between, the next request reads a new timestamp and re-parses.
            cached = (key, Metadata[Targets].from_bytes(current).signed.targets
                      if current else {}, deltas.signed.targets if deltas else {})
            with self._cache_lock:
                self._signed_targets = cached
        return (cached[2] if path.startswith(f"{DELTAS}/") else cached[1]).get(path)

    def _snapshot(self) -> Metadata[Snapshot] | None:
        ts = self._timestamp()
        if ts is None:
            return None
        return Metadata[Snapshot].from_bytes(
            (self.metadata_dir / f"{ts.signed.snapshot_meta.version}.snapshot.json").read_bytes())

    def _current_deltas(self) -> Metadata[Targets] | None:
        snap = self._snapshot()
        meta = snap.signed.meta.get(f"{DELTAS}.json") if snap else None
        if meta is None:
            return None
        return Metadata[Targets].from_bytes(
            (self.metadata_dir / f"{meta.version}.{DELTAS}.json").read_bytes())

    def publish_deltas(self, add: dict[str, TargetFile], *, now: datetime | None = None) -> int:
        """Sign delta targets with the online key (the delegated `deltas` role)."""
        now = now or datetime.now(UTC)
        with self._writing():
            for path, info in add.items():
                if not path.startswith(f"{DELTAS}/"):
                    raise VerificationError(f"{path}: delta targets live under {DELTAS}/")
                if self.object_path(info.hashes.get("sha256", "")) is None:
                    raise VerificationError(f"{path}: delta bytes were not stored")
            current = self._current_deltas()
            deltas = current.signed if current else Targets(version=0, expires=now)
            deltas.version += 1
            deltas.targets.update(add)
            deltas.expires = now.replace(microsecond=0) + self._snapshot_expiry
            md = Metadata(deltas)
            md.sign(self._signer)
            _atomic_write(self.metadata_dir / f"{deltas.version}.{DELTAS}.json", md.to_bytes())
            snap = self._snapshot()
            self._sign_snapshot_and_timestamp(snap.signed.meta["targets.json"].version, now,
                                              deltas_version=deltas.version)
            return deltas.version

    def object_path(self, sha256: str) -> Path | None:
        """The object's bytes on local disk (fetched from the object store if only it has
        them), or None when nobody has them."""
        if not _SHA256.match(sha256):
            return None
        path = self.objects_dir / sha256
        if path.is_file():
            return path
        if self.remote is not None and self.remote.fetch(sha256, path):
            return path
        return None

    def object_url(self, sha256: str) -> str | None:
        """Where a device may download the object directly (an object store's presigned
        URL), or None when the API serves it."""
        if self.remote is None or not _SHA256.match(sha256):
            return None
        return self.remote.url(sha256)

    # ---- writing -------------------------------------------------------------------------

    def store_object(self, stream: BinaryIO, *, max_bytes: int) -> tuple[str, int]:
        """Copy a stream into the object store, content-addressed; return (sha256, size)."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.objects_dir, prefix=".upload.")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise VerificationError(f"upload exceeds the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            os.replace(tmp, self.objects_dir / sha)
            if self.remote is not None:
                self.remote.put(sha, self.objects_dir / sha)
            return sha, size
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def publish(self, signed_targets: bytes, *, now: datetime | None = None) -> Targets:
        """Verify operator-signed targets and make them current; return the new Targets."""
        now = now or datetime.now(UTC)
        try:
            md = Metadata[Targets].from_bytes(signed_targets)
        except Exception as exc:
            raise VerificationError(f"targets metadata is malformed: {exc}") from exc
        if not isinstance(md.signed, Targets):
            raise VerificationError(f"expected targets metadata, got {md.signed.type}")
        if md.signed.is_expired(now):
            raise VerificationError("targets metadata has already expired")
        with self._writing():  # the root as of now: another process may have rotated keys
            try:
                self.root.signed.verify_delegate(Targets.type, md.signed_bytes, md.signatures)
            except UnsignedMetadataError as exc:
                raise VerificationError("targets metadata is not signed by the targets key of "
                                        "the trusted root") from exc
            current = self.current_targets()
            current_version = Metadata[Targets].from_bytes(current).signed.version if current else 0
            if md.signed.version != current_version + 1:
                raise VerificationError(
                    f"targets version {md.signed.version} does not follow the current version "
                    f"{current_version} (someone else published meanwhile? fetch and re-sign)")
            for path, info in md.signed.targets.items():
                sha = info.hashes.get("sha256")
                obj = self.object_path(sha or "")
                if obj is None:
                    raise VerificationError(f"target {path}: its bytes were not uploaded")
                if obj.stat().st_size != info.length:
                    raise VerificationError(f"target {path}: length differs from the upload")
            _atomic_write(self.metadata_dir / f"{md.signed.version}.targets.json", signed_targets)
            deltas = self._current_deltas()
            deltas_version = deltas.signed.version if deltas else None
            delegations = md.signed.delegations
            if deltas is None and delegations is not None and delegations.roles and \
                    DELTAS in delegations.roles:
                # The delegation needs its (empty) metadata before any client walks it.
                empty = Targets(version=1, expires=now.replace(microsecond=0)
                                + self._snapshot_expiry)
                empty_md = Metadata(empty)
                empty_md.sign(self._signer)
                _atomic_write(self.metadata_dir / f"1.{DELTAS}.json", empty_md.to_bytes())
                deltas_version = 1
            self._sign_snapshot_and_timestamp(md.signed.version, now,
                                              deltas_version=deltas_version)
            return md.signed

    def _sign_snapshot_and_timestamp(self, targets_version: int, now: datetime, *,
                                     deltas_version: int | None = None) -> None:
        now = now.replace(microsecond=0)
        ts = self._timestamp()
        snap_version = ts.signed.snapshot_meta.version + 1 if ts else 1
        meta = {"targets.json": MetaFile(targets_version)}
        if deltas_version is not None:
            meta[f"{DELTAS}.json"] = MetaFile(deltas_version)
        snapshot = Snapshot(version=snap_version, expires=now + self._snapshot_expiry,
                            meta=meta)
        snap_md = Metadata(snapshot)
        snap_md.sign(self._signer)
        _atomic_write(self.metadata_dir / f"{snap_version}.snapshot.json", snap_md.to_bytes())
        timestamp = Timestamp(version=(ts.signed.version + 1) if ts else 1,
                              expires=now + self._timestamp_expiry,
                              snapshot_meta=MetaFile(snap_version))
        ts_md = Metadata(timestamp)
        ts_md.sign(self._signer)
        _atomic_write(self.metadata_dir / "timestamp.json", ts_md.to_bytes())

    def refresh_online_metadata(self, *, now: datetime | None = None) -> bool:
        """Re-sign snapshot and timestamp when either is in the last half of its lifetime."""
        now = now or datetime.now(UTC)
        if not self._online_metadata_aging(now):  # the common case: no lock taken
            return False
        with self._writing():
            if not self._online_metadata_aging(now):  # another process has just signed
                return False
            snap = self._snapshot().signed
            deltas = snap.meta.get(f"{DELTAS}.json")
            self._sign_snapshot_and_timestamp(snap.meta["targets.json"].version, now,
                                              deltas_version=deltas.version if deltas else None)
            return True

    def _online_metadata_aging(self, now: datetime) -> bool:
        with self._lock:
            key = self._timestamp_bytes()
            if key is None:
                return False
            if self._expiry is None or self._expiry[0] != key:  # parsed once per timestamp
                ts = Metadata[Timestamp].from_bytes(key)
                snap_version = ts.signed.snapshot_meta.version
                snap = Metadata[Snapshot].from_bytes(
                    (self.metadata_dir / f"{snap_version}.snapshot.json").read_bytes()).signed
                self._expiry = (key, ts.signed.expires, snap.expires)
            _key, ts_expires, snap_expires = self._expiry
            return (ts_expires - now <= self._timestamp_expiry / 2
                    or snap_expires - now <= self._snapshot_expiry / 2)
