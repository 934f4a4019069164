"""The agent's persistent files: identity (written once at enrollment) and state.

Invariant: `state.json` is only ever replaced atomically (tempfile + fsync + os.replace), so
after a power cut it holds either the previous or the new record, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..artifacts import MODEL_COMPONENT
from ._errors import AgentConfigError
from ._machine import State

__all__ = ["AgentRecord", "Identity", "ReleaseRef", "StateDir", "atomic_write_bytes",
           "atomic_write_json"]

HISTORY_LIMIT = 100
OUTBOX_LIMIT = 500


def atomic_write_json(path: Path, data: Any, *, mode: int = 0o644) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode(), mode=mode)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Identity:
    server_url: str
    device_id: str
    name: str
    hardware: str
    pinned_ca: bool = False  # state_dir/ca.pem is the only CA trusted for the server


@dataclass(frozen=True)
class ReleaseRef:
    release_id: str
    name: str
    version: str
    manifest_target: str
    window: dict[str, Any] | None = None  # maintenance window policy from the server
    timezone: str = "UTC"
    rollout_id: str | None = None
    component: str = MODEL_COMPONENT  # `artifacts.component_of` the release

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class AgentRecord:
    """Everything the agent must remember across restarts: the update state of the model
    component (the release the agent serves) and, in `components`, one record of the same
    shape per other component (container apps, by name), each with its own state, slots,
    attempts and rejections. Reports and history live in the top record only."""

    state: State = State.IDLE
    installed: ReleaseRef | None = None  # the committed release, in `installed_slot`
    installed_slot: str | None = None
    target: ReleaseRef | None = None  # the release being installed
    pending_slot: str | None = None
    # Release ids that failed health checks; manifest targets whose signed terms we refused.
    rejected: list[str] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)  # failed attempts per release id
    entries: dict[str, int] = field(default_factory=dict)  # state entries in this attempt
    target_seen_at: str | None = None  # when the current target was first offered
    last_error: str = ""
    last_health: dict[str, Any] = field(default_factory=dict)
    last_download: dict[str, int] = field(default_factory=dict)  # bytes: full vs sent
    history: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[dict[str, Any]] = field(default_factory=list)  # reports not yet delivered
    # Anti-downgrade (trust._terms): the highest release counter ever committed and the
    # fallbacks that release signed; the terms of the release being installed.
    release_counter: int = 0
    fallbacks: list[str] = field(default_factory=list)
    target_terms: dict[str, Any] | None = None
    component: str = MODEL_COMPONENT
    components: dict[str, AgentRecord] = field(default_factory=dict)
    # A release whose dependencies were unmet -> the committed components it was checked
    # against: it is tried again only once those change.
    blocked: dict[str, str] = field(default_factory=dict)

    def lanes(self) -> list[AgentRecord]:
        """Every component's record: the model first, then the others by name."""
        return [self, *(self.components[name] for name in sorted(self.components))]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentRecord:
        data = dict(data)
        data["state"] = State(data["state"])
        for key in ("installed", "target"):
            if data.get(key) is not None:
                data[key] = ReleaseRef(**data[key])
        data["components"] = {name: cls.from_json(sub)
                              for name, sub in (data.get("components") or {}).items()}
        return cls(**data)


class StateDir:
    """Layout of an agent's state directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.identity_path = self.root / "identity.json"
        self.device_key_path = self.root / "device.key"  # private, generated here, 0600
        self.director_root_path = self.root / "director-root.json"  # from enrollment
        self.director_dir = self.root / "director"  # the director updater's metadata
        self.trusted_root_path = self.root / "root.json"
        self.ca_path = self.root / "ca.pem"
        self.state_path = self.root / "state.json"
        self.tuf_dir = self.root / "tuf"
        self.downloads_dir = self.root / "downloads"
        self.slots_dir = self.root / "slots"
        # Written by the device's users (CLI, local API), read by the daemon: separate files,
        # so two processes never write state.json.
        self.defer_path = self.root / "defer.json"
        self.feedback_dir = self.root / "feedback"

    def ensure_device_key(self):
        """The device's Ed25519 key, generated (0600, atomically) the first time: before
        anything is sent to the server, so an enrollment whose answer is lost can be retried
        with the same key."""
        from ..trust import new_device_key

        if not self.device_key_path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.device_key_path, new_device_key()[1], mode=0o600)
        return self.device_key()

    def save_identity(self, identity: Identity, trusted_root: bytes, director_root: bytes,
                      ca_pem: bytes | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.director_root_path.write_bytes(director_root)
        self.trusted_root_path.write_bytes(trusted_root)
        if ca_pem is not None:
            self.ca_path.write_bytes(ca_pem)
        atomic_write_json(self.identity_path, asdict(identity), mode=0o600)

    def load_identity(self) -> Identity:
        try:
            data = json.loads(self.identity_path.read_text())
            if "credential" in data:
                raise AgentConfigError(f"{self.root} was enrolled by an older agent with a "
                                       "bearer credential; enroll again into a new state "
                                       "directory (devices now sign requests with a key pair)")
            return Identity(**data)
        except FileNotFoundError:
            raise AgentConfigError(
                f"{self.root} is not an enrolled agent (run `edgewise agent enroll` first)"
            ) from None
        except (ValueError, TypeError) as exc:
            raise AgentConfigError(f"{self.identity_path} is corrupt: {exc}") from exc

    def device_key(self):
        """The device's Ed25519 private key (trust._device_auth)."""
        from ..trust._device_auth import DeviceAuthError, load_device_key

        try:
            return load_device_key(self.device_key_path.read_bytes())
        except FileNotFoundError:
            raise AgentConfigError(f"{self.device_key_path} is missing: this device cannot "
                                   "prove its identity; enroll again") from None
        except DeviceAuthError as exc:
            raise AgentConfigError(f"{self.device_key_path}: {exc}") from exc

    def tls_verify(self, identity: Identity):
        """What httpx verifies the server against: the pinned CA, else the system store."""
        from ..trust import client_tls

        return client_tls(self.ca_path if identity.pinned_ca else None)

    def director_root(self) -> bytes:
        try:
            return self.director_root_path.read_bytes()
        except FileNotFoundError:
            raise AgentConfigError(f"{self.director_root_path} is missing (enrolled by an older "
                                   "agent?): enroll again") from None

    def trusted_root(self) -> bytes:
        try:
            return self.trusted_root_path.read_bytes()
        except FileNotFoundError:
            raise AgentConfigError(f"{self.trusted_root_path} is missing") from None

    def load_record(self) -> AgentRecord:
        if not self.state_path.exists():
            return AgentRecord()
        try:
            return AgentRecord.from_json(json.loads(self.state_path.read_text()))
        except (ValueError, TypeError, KeyError) as exc:
            raise AgentConfigError(f"{self.state_path} is corrupt: {exc}") from exc

    def save_record(self, record: AgentRecord) -> None:
        record.history = record.history[-HISTORY_LIMIT:]
        record.outbox = record.outbox[-OUTBOX_LIMIT:]
        atomic_write_json(self.state_path, record.to_json())
