"""TUF attacks against the device's verified downloads, one named test per threat.

The repository is the real server-side `ServerRepository` (operator-signed targets, online
snapshot/timestamp); the attacker controls the mirror in between (python-tuf's
FetcherInterface seam) or even the server's online key. The device must refuse, and its
trusted metadata must stay where it was."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, MetaFile, Snapshot, Targets, Timestamp
from tuf.ngclient import FetcherInterface

from edgewise.trust import (
    ServerRepository,
    TrustedClient,
    VerificationError,
    init_keys,
    load_root,
    load_signer,
    sign_targets,
    target_file,
)

BASE = "https://mirror.example"


class Mirror(FetcherInterface):
    """Serves a repository directory; the attacker's hooks rewrite what goes out."""

    def __init__(self, repo: ServerRepository) -> None:
        self.repo = repo
        self.overrides: dict[str, bytes] = {}

    def _fetch(self, url: str):
        path = url.removeprefix(BASE)
        if path in self.overrides:
            return iter([self.overrides[path]])
        if path.startswith("/tuf/metadata/"):
            found = self.repo.metadata_file(path.rsplit("/", 1)[1])
        else:
            name = path.rsplit("/", 1)[1]
            found = self.repo.object_path(name.split(".", 1)[0])
        if found is None:
            raise tuf_exc.DownloadHTTPError(f"404 {path}", 404)
        return iter([found.read_bytes()])


@pytest.fixture
def world(tmp_path: Path):
    keys = init_keys(tmp_path / "keys")
    repo = ServerRepository(tmp_path / "repo", root=keys.root_json.read_bytes(),
                            online_signer=load_signer(keys.online_key))

    def publish(name: str, content: bytes) -> str:
        src = tmp_path / name.replace("/", "_")
        src.write_bytes(content)
        repo.store_object(io.BytesIO(content), max_bytes=1 << 20)
        signed = sign_targets(root=load_root(keys.root_json), signer=load_signer(keys.targets_key),
                              current=repo.current_targets(), add={name: target_file(name, src)})
        repo.publish(signed)
        return name

    def device(mirror: Mirror) -> TrustedClient:
        return TrustedClient(metadata_dir=tmp_path / "device-tuf",
                             trusted_root=keys.root_json.read_bytes(), base_url=BASE,
                             fetcher=mirror)

    return keys, repo, publish, device


def _trusted_versions(tmp_path: Path) -> dict[str, int]:
    out = {}
    for role in ("timestamp", "snapshot", "targets"):
        path = tmp_path / "device-tuf" / f"{role}.json"
        if path.exists():
            out[role] = json.loads(path.read_text())["signed"]["version"]
    return out


def test_baseline_verified_download(world, tmp_path: Path) -> None:
    keys, repo, publish, device = world
    publish("m/1/model.onnx", b"\x08model-v1")
    dest = tmp_path / "out"
    device(Mirror(repo)).download("m/1/model.onnx", dest)
    assert dest.read_bytes() == b"\x08model-v1"


def test_arbitrary_installation_tampered_artifact(world, tmp_path: Path) -> None:
    keys, repo, publish, device = world
    publish("m/1/model.onnx", b"\x08model-v1")
    mirror = Mirror(repo)
    sha = repo.target("m/1/model.onnx").hashes["sha256"]
    mirror.overrides[f"/tuf/targets/m/1/{sha}.model.onnx"] = b"\x08evil-v1!"  # same length
    dest = tmp_path / "out"
    with pytest.raises(VerificationError, match="verification failed"):
        device(mirror).download("m/1/model.onnx", dest)
    assert not dest.exists()


def test_arbitrary_installation_target_not_in_signed_metadata(world, tmp_path: Path) -> None:
    keys, repo, publish, device = world
    publish("m/1/model.onnx", b"\x08model-v1")
    with pytest.raises(VerificationError, match="not a signed target"):
        device(Mirror(repo)).download("m/1/backdoor.onnx", tmp_path / "out")


def test_rollback_attack_replayed_older_metadata(world, tmp_path: Path) -> None:
    keys, repo, publish, device = world
    publish("m/1/model.onnx", b"\x08model-v1")
    old_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()
    publish("m/2/model.onnx", b"\x08model-v2")
    device(Mirror(repo)).refresh()  # the device has seen the newer repository state
    before = _trusted_versions(tmp_path)
    mirror = Mirror(repo)
    mirror.overrides["/tuf/metadata/timestamp.json"] = old_timestamp
    with pytest.raises(VerificationError):
        device(mirror).refresh()
    assert _trusted_versions(tmp_path) == before


def test_indefinite_freeze_expired_timestamp(world, tmp_path: Path) -> None:
    keys, repo, publish, device = world
    publish("m/1/model.onnx", b"\x08model-v1")
    ts = Metadata[Timestamp].from_bytes((repo.metadata_dir / "timestamp.json").read_bytes())
    ts.signed.version += 1
    ts.signed.expires = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    ts.sign(load_signer(keys.online_key))  # validly signed, but stale: a frozen mirror
    mirror = Mirror(repo)
    mirror.overrides["/tuf/metadata/timestamp.json"] = ts.to_bytes()
    with pytest.raises(VerificationError, match="expired|Expired"):
        device(mirror).refresh()


def test_endless_data_oversized_artifact(world, tmp_path: Path) -> None:
    keys, repo, publish, device = world
    publish("m/1/model.onnx", b"\x08model-v1")
    sha = repo.target("m/1/model.onnx").hashes["sha256"]
    mirror = Mirror(repo)
    mirror.overrides[f"/tuf/targets/m/1/{sha}.model.onnx"] = b"\x08model-v1" + b"\0" * 10_000_000
    dest = tmp_path / "out"
    with pytest.raises(Exception, match="length|Length|exceeds"):
        device(mirror).download("m/1/model.onnx", dest)
    assert not dest.exists()


def test_endless_data_oversized_metadata(world, tmp_path: Path) -> None:
    keys, repo, publish, device = world
    publish("m/1/model.onnx", b"\x08model-v1")
    mirror = Mirror(repo)
    mirror.overrides["/tuf/metadata/timestamp.json"] = b"{" + b" " * (1 << 20) + b"}"
    with pytest.raises(Exception, match="length|Length|exceeds|limit"):
        device(mirror).refresh()


def test_mix_and_match_targets_from_another_version(world, tmp_path: Path) -> None:
    keys, repo, publish, device = world
    publish("m/1/model.onnx", b"\x08model-v1")
    old_targets = (repo.metadata_dir / "1.targets.json").read_bytes()
    publish("m/2/model.onnx", b"\x08model-v2")
    mirror = Mirror(repo)
    # The snapshot says targets v2; the mirror hands out v1 under v2's name.
    mirror.overrides["/tuf/metadata/2.targets.json"] = old_targets
    with pytest.raises(VerificationError):
        device(mirror).download("m/2/model.onnx", tmp_path / "out")


def test_stolen_server_with_online_keys_cannot_publish(world, tmp_path: Path) -> None:
    """The attacker owns the server and its online key, but not the offline targets key."""
    keys, repo, publish, device = world
    publish("m/1/model.onnx", b"\x08model-v1")
    online = load_signer(keys.online_key)
    evil = b"\x08evil"
    repo.store_object(io.BytesIO(evil), max_bytes=1 << 20)
    src = tmp_path / "evil.onnx"
    src.write_bytes(evil)
    targets = Metadata[Targets].from_bytes(repo.current_targets())
    targets.signed.targets["m/666/model.onnx"] = target_file("m/666/model.onnx", src)
    targets.signed.version += 1
    targets.signatures.clear()
    targets.sign(online)  # the only key they have
    # The server refuses to publish it ...
    with pytest.raises(VerificationError, match="not signed by the targets key"):
        repo.publish(targets.to_bytes())
    # ... and if they bypass the server code and write metadata themselves, devices refuse.
    (repo.metadata_dir / f"{targets.signed.version}.targets.json").write_bytes(
        targets.to_bytes())
    snap = Metadata(Snapshot(version=99, expires=datetime.now(UTC).replace(microsecond=0)
                             + timedelta(days=1),
                             meta={"targets.json": MetaFile(targets.signed.version)}))
    snap.sign(online)
    (repo.metadata_dir / "99.snapshot.json").write_bytes(snap.to_bytes())
    ts = Metadata(Timestamp(version=99, expires=datetime.now(UTC).replace(microsecond=0)
                            + timedelta(days=1), snapshot_meta=MetaFile(99)))
    ts.sign(online)
    (repo.metadata_dir / "timestamp.json").write_bytes(ts.to_bytes())
    with pytest.raises(VerificationError):
        device(Mirror(repo)).download("m/666/model.onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_foreign_root_is_not_trusted(world, tmp_path: Path) -> None:
    keys, repo, publish, device = world
    publish("m/1/model.onnx", b"\x08model-v1")
    other = init_keys(tmp_path / "other")
    client = TrustedClient(metadata_dir=tmp_path / "other-device",
                           trusted_root=other.root_json.read_bytes(), base_url=BASE,
                           fetcher=Mirror(repo))
    with pytest.raises(VerificationError):
        client.download("m/1/model.onnx", tmp_path / "out")

