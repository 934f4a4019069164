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

__all__ = [
    "KeyPaths",
    "init_keys",
    "load_root",
    "load_signer",
    "role_key_files",
    "rotate_keys",
    "write_private",
]

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


def role_key_files(directory: Path | str, stem: str) -> list[Path]:
    """`root.pem`, `root-2.pem`, ... (the first key keeps the plain name)."""
    d = Path(directory)
    first = d / f"{stem}.pem"
    extra = sorted(d.glob(f"{stem}-*.pem"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return ([first] if first.exists() else []) + extra


def _key_file(directory: Path, stem: str, index: int) -> Path:
    return directory / (f"{stem}.pem" if index == 0 else f"{stem}-{index + 1}.pem")


def init_keys(directory: Path | str, *, root_keys: int = 1, root_threshold: int = 1,
              targets_keys: int = 1, targets_threshold: int = 1) -> KeyPaths:
    """Generate ed25519 keys for every top-level role and sign root v1 (consistent snapshots).

    Root and targets may be k-of-n: `root_keys` keys with `root_threshold` required, etc.;
    the extra keys are `root-2.pem`, `targets-2.pem`, ... (hand each to a different person).
    """
    directory = Path(directory)
    paths = KeyPaths.in_dir(directory)
    for n, k, role in ((root_keys, root_threshold, "root"),
                       (targets_keys, targets_threshold, "targets")):
        if not 1 <= k <= n:
            raise KeyFileError(f"{role}: threshold {k} must be between 1 and {n} keys")
    existing = [p for p in (paths.root_key, paths.targets_key, paths.online_key, paths.root_json)
                if p.exists()]
    if existing:
        raise KeyFileError(
            f"refusing to overwrite existing key material: {', '.join(map(str, existing))}"
        )
    directory.mkdir(parents=True, exist_ok=True)

    root_signers = [CryptoSigner.generate_ed25519() for _ in range(root_keys)]
    targets_signers = [CryptoSigner.generate_ed25519() for _ in range(targets_keys)]
    online_signer = CryptoSigner.generate_ed25519()

    root = Root(expires=datetime.now(UTC).replace(microsecond=0) + ROOT_EXPIRY,
                consistent_snapshot=True)
    for signer in root_signers:
        root.add_key(signer.public_key, Root.type)
    for signer in targets_signers:
        root.add_key(signer.public_key, "targets")
    root.add_key(online_signer.public_key, "snapshot")
    root.add_key(online_signer.public_key, "timestamp")
    root.roles[Root.type].threshold = root_threshold
    root.roles["targets"].threshold = targets_threshold
    md = Metadata(root)
    for signer in root_signers:
        md.sign(signer, append=True)

    for i, signer in enumerate(root_signers):
        write_private(_key_file(directory, "root", i), signer)
    for i, signer in enumerate(targets_signers):
        write_private(_key_file(directory, "targets", i), signer)
    write_private(paths.online_key, online_signer)
    paths.root_json.write_bytes(md.to_bytes())
    (directory / "1.root.json").write_bytes(md.to_bytes())
    return paths


def rotate_keys(directory: Path | str, *, role: str, keys: int = 1,
                threshold: int = 1) -> tuple[Metadata[Root], Metadata[Root]]:
    """Replace the keys of `role` ("root", "targets" or "online") with new ones in a new root
    version, signed by the current root keys (and the new ones, for a root rotation).

    Old private keys move to `DIR/retired/` (destroy them when every device has moved on);
    every root version stays as `DIR/N.root.json`, because devices walk the chain.
    Returns (old root, new root).
    """
    directory = Path(directory)
    if role not in ("root", "targets", "online"):
        raise KeyFileError("role is root, targets or online")
    if not 1 <= threshold <= keys:
        raise KeyFileError(f"threshold {threshold} must be between 1 and {keys} keys")
    old = load_root(directory / "root.json")
    old_root_signers = [load_signer(p) for p in role_key_files(directory, "root")]
    have = {s.public_key.keyid for s in old_root_signers} & set(old.signed.roles["root"].keyids)
    if len(have) < old.signed.roles["root"].threshold:
        raise KeyFileError(f"rotating needs {old.signed.roles['root'].threshold} of the current "
                           f"root keys in {directory}, found {len(have)}")
    new_signers = [CryptoSigner.generate_ed25519() for _ in range(keys)]
    root = Metadata[Root].from_bytes(old.to_bytes()).signed
    root.version += 1
    root.expires = datetime.now(UTC).replace(microsecond=0) + ROOT_EXPIRY
    roles = ["snapshot", "timestamp"] if role == "online" else [role]
    for name in roles:
        for keyid in list(root.roles[name].keyids):
            root.revoke_key(keyid, name)
        for signer in new_signers:
            root.add_key(signer.public_key, name)
        root.roles[name].threshold = threshold if role != "online" else 1
    md = Metadata(root)
    for signer in old_root_signers:
        md.sign(signer, append=True)  # the old root vouches for the new one
    if role == "root":
        for signer in new_signers:
            md.sign(signer, append=True)  # ... and the new keys accept it

    retired = directory / "retired" / f"v{old.signed.version}"
    retired.mkdir(parents=True, exist_ok=True)
    stem = {"root": "root", "targets": "targets", "online": "online"}[role]
    for path in role_key_files(directory, stem):
        path.rename(retired / path.name)
    for i, signer in enumerate(new_signers):
        write_private(_key_file(directory, stem, i), signer)
    (directory / f"{old.signed.version}.root.json").write_bytes(old.to_bytes())
    (directory / f"{root.version}.root.json").write_bytes(md.to_bytes())
    (directory / "root.json").write_bytes(md.to_bytes())
    return old, md
