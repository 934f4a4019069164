"""Key files and the initial trusted root.

Invariant: private keys are written 0600 as PEM/PKCS8 and are never part of anything the
server or a device receives; `root.json` carries only public keys.

Layout made by `init_keys(DIR)`:
    DIR/root.pem, DIR/targets.pem   offline keys: stay on the operator's machine
    DIR/online.pem                  snapshot + timestamp key: handed to the update server
    DIR/root.json                   trusted root v1: given to the server and to every device
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from ._errors import KeyFileError

__all__ = ["KeyPaths", "init_keys", "load_root", "load_signer", "write_private"]

ROOT_EXPIRY = timedelta(days=365)


@dataclass(frozen=True)
class KeyPaths:
    root_key: Path
    targets_key: Path
    online_key: Path
    root_json: Path

    @classmethod
    def in_dir(cls, directory: Path) -> KeyPaths:
        d = Path(directory)
        return cls(d / "root.pem", d / "targets.pem", d / "online.pem", d / "root.json")


def write_private(path: Path, signer: CryptoSigner) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signer.private_bytes)


def load_signer(path: Path | str) -> CryptoSigner:
    path = Path(path)
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file {path} not found") from exc
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    try:
        return CryptoSigner(key)
    except ValueError as exc:
        raise KeyFileError(f"{path}: unsupported key type: {exc}") from exc


def load_root(path: Path | str) -> Metadata[Root]:
    path = Path(path)
    try:
        md = Metadata[Root].from_bytes(path.read_bytes())
    except FileNotFoundError as exc:
        raise KeyFileError(f"trusted root {path} not found") from exc
    except Exception as exc:  # tuf raises DeserializationError and friends
        raise KeyFileError(f"{path} is not valid TUF root metadata: {exc}") from exc
    if not isinstance(md.signed, Root):
        raise KeyFileError(f"{path} holds {md.signed.type} metadata, not root")
    return md


def init_keys(directory: Path | str) -> KeyPaths:
    """Generate ed25519 keys for every top-level role and sign root v1 (consistent snapshots)."""
    paths = KeyPaths.in_dir(Path(directory))
    existing = [p for p in (paths.root_key, paths.targets_key, paths.online_key, paths.root_json)
                if p.exists()]
    if existing:
        raise KeyFileError(
            f"refusing to overwrite existing key material: {', '.join(map(str, existing))}"
        )
    paths.root_key.parent.mkdir(parents=True, exist_ok=True)

    root_signer = CryptoSigner.generate_ed25519()
    targets_signer = CryptoSigner.generate_ed25519()
    online_signer = CryptoSigner.generate_ed25519()

    root = Root(expires=datetime.now(UTC).replace(microsecond=0) + ROOT_EXPIRY,
                consistent_snapshot=True)
    root.add_key(root_signer.public_key, Root.type)
    root.add_key(targets_signer.public_key, "targets")
    root.add_key(online_signer.public_key, "snapshot")
    root.add_key(online_signer.public_key, "timestamp")
    md = Metadata(root)
    md.sign(root_signer)

    write_private(paths.root_key, root_signer)
    write_private(paths.targets_key, targets_signer)
    write_private(paths.online_key, online_signer)
    paths.root_json.write_bytes(md.to_bytes())
    return paths
