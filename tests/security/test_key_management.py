"""k-of-n thresholds and key rotation: devices follow the root chain; retired keys lose power."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, MetaFile, Timestamp

from edgewise.trust import (
    KeyFileError,
    ServerRepository,
    TrustedClient,
    VerificationError,
    init_keys,
    load_root,
    load_signer,
    role_key_files,
    rotate_keys,
    sign_targets,
    target_file,
)
from tests.security.test_tuf_attacks import BASE, Mirror


class World:
    def __init__(self, tmp_path: Path, **thresholds: int) -> None:
        self.tmp = tmp_path
        self.keys_dir = tmp_path / "keys"
        self.keys = init_keys(self.keys_dir, **thresholds)
        self.device_root = self.keys.root_json.read_bytes()  # provisioned once, never updated
        self.repo = self._repo()

    def _repo(self) -> ServerRepository:
        return ServerRepository(self.tmp / "repo", root=self.keys.root_json.read_bytes(),
                                online_signer=load_signer(self.keys.online_key))

    def restart_server(self) -> None:
        self.repo = self._repo()

    def publish(self, name: str, content: bytes, *, key_files: list[Path] | None = None,
                current_root=None) -> None:
        add = {}
        if name:
            src = self.tmp / name.replace("/", "_")
            src.write_bytes(content)
            self.repo.store_object(io.BytesIO(content), max_bytes=1 << 20)
            add = {name: target_file(name, src)}
        files = key_files if key_files is not None else role_key_files(self.keys_dir, "targets")
        signed = sign_targets(root=load_root(self.keys.root_json),
                              signer=[load_signer(p) for p in files],
                              current=self.repo.current_targets(),
                              add=add,
                              current_root=current_root)
        self.repo.publish(signed)

    def device_download(self, name: str) -> bytes:
        client = TrustedClient(metadata_dir=self.tmp / "device", trusted_root=self.device_root,
                               base_url=BASE, fetcher=Mirror(self.repo))
        dest = self.tmp / "got"
        dest.unlink(missing_ok=True)
        client.download(name, dest)
        return dest.read_bytes()


def test_targets_threshold_two_of_three(tmp_path: Path) -> None:
    w = World(tmp_path, targets_keys=3, targets_threshold=2)
    keys = role_key_files(w.keys_dir, "targets")
    assert len(keys) == 3
    with pytest.raises(KeyFileError, match="needs 2 of the 3 targets keys"):
        w.publish("m/1/model.onnx", b"\x08one", key_files=keys[:1])
    w.publish("m/1/model.onnx", b"\x08one", key_files=[keys[0], keys[2]])
    assert w.device_download("m/1/model.onnx") == b"\x08one"


def test_root_threshold_is_enforced_by_devices(tmp_path: Path) -> None:
    w = World(tmp_path, root_keys=3, root_threshold=2)
    w.publish("m/1/model.onnx", b"\x08one")
    # One root key alone cannot make a new root that devices accept.
    root = load_root(w.keys.root_json)
    root.signed.version += 1
    root.signatures.clear()
    root.sign(load_signer(role_key_files(w.keys_dir, "root")[0]))
    with pytest.raises(VerificationError, match="threshold of the current root"):
        w.repo.add_root(root.to_bytes())


def test_targets_key_rotation(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.publish("m/1/model.onnx", b"\x08one")
    assert w.device_download("m/1/model.onnx") == b"\x08one"
    retired_targets = load_signer(w.keys.targets_key)
    old, new = rotate_keys(w.keys_dir, role="targets")
    assert new.signed.version == 2 and (w.keys_dir / "1.root.json").exists()
    w.repo.add_root(new.to_bytes())
    w.publish("", b"", current_root=old)  # re-sign the current targets with the new key
    w.publish("m/2/model.onnx", b"\x08two")
    # The device, provisioned with root v1, walks to v2 and trusts the new key.
    assert w.device_download("m/2/model.onnx") == b"\x08two"
    assert w.device_download("m/1/model.onnx") == b"\x08one"
    # The retired key can no longer publish.
    src = tmp_path / "evil"
    src.write_bytes(b"\x08evil")
    w.repo.store_object(io.BytesIO(b"\x08evil"), max_bytes=1 << 20)
    md = Metadata.from_bytes(w.repo.current_targets())
    md.signed.version += 1
    md.signed.targets["m/6/model.onnx"] = target_file("m/6/model.onnx", src)
    md.signatures.clear()
    md.sign(retired_targets)
    with pytest.raises(VerificationError, match="not signed by the targets key"):
        w.repo.publish(md.to_bytes())


def test_online_key_rotation_and_a_stolen_old_online_key(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.publish("m/1/model.onnx", b"\x08one")
    assert w.device_download("m/1/model.onnx") == b"\x08one"
    stolen = load_signer(w.keys.online_key)
    old, new = rotate_keys(w.keys_dir, role="online")
    w.repo.add_root(new.to_bytes())
    w.restart_server()  # with the new online.pem: snapshot/timestamp are re-signed at start
    w.publish("m/2/model.onnx", b"\x08two")
    assert w.device_download("m/2/model.onnx") == b"\x08two"
    # A thief with the retired online key forges a fresh timestamp: refused.
    ts = Metadata[Timestamp].from_bytes((w.repo.metadata_dir / "timestamp.json").read_bytes())
    forged = Metadata(Timestamp(version=ts.signed.version + 5,
                                expires=datetime.now(UTC).replace(microsecond=0)
                                + timedelta(days=1),
                                snapshot_meta=MetaFile(ts.signed.snapshot_meta.version)))
    forged.sign(stolen)
    mirror = Mirror(w.repo)
    mirror.overrides["/tuf/metadata/timestamp.json"] = forged.to_bytes()
    client = TrustedClient(metadata_dir=tmp_path / "device", trusted_root=w.device_root,
                           base_url=BASE, fetcher=mirror)
    with pytest.raises(VerificationError):
        client.refresh()


def test_root_key_rotation_needs_old_and_new_keys(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.publish("m/1/model.onnx", b"\x08one")
    old, new = rotate_keys(w.keys_dir, role="root")
    assert len(new.signatures) == 2  # old root key + new root key
    w.repo.add_root(new.to_bytes())
    w.publish("m/2/model.onnx", b"\x08two")
    assert w.device_download("m/2/model.onnx") == b"\x08two"
    # A root v3 signed only by the retired root key is refused.
    retired = load_signer(next((w.keys_dir / "retired").rglob("root.pem")))
    v3 = Metadata.from_bytes(new.to_bytes())
    v3.signed.version = 3
    v3.signatures.clear()
    v3.sign(retired)
    with pytest.raises(VerificationError):
        w.repo.add_root(v3.to_bytes())


def test_rotation_needs_the_current_root_keys(tmp_path: Path) -> None:
    w = World(tmp_path, root_keys=2, root_threshold=2)
    role_key_files(w.keys_dir, "root")[1].unlink()  # one holder is away
    with pytest.raises(KeyFileError, match="needs 2 of the current root keys"):
        rotate_keys(w.keys_dir, role="targets")


@pytest.mark.slow
def test_cli_rotation_end_to_end_with_a_real_agent(live_server, enroll_agent,
                                                   tmp_path: Path) -> None:
    import os
    import subprocess

    from edgewise.agent import agent_status
    from edgewise.sim import edgewise_command
    from tests.conftest import make_tiny_bundle
    from tests.test_e2e_update import run_once

    state = enroll_agent("rot")
    live_server.publish(make_tiny_bundle(tmp_path / "v1"))
    assert run_once(state, tmp_path) == 0
    env = {**os.environ, "EDGEWISE_SERVER": live_server.url,
           "EDGEWISE_TOKEN": live_server.admin_token, "EDGEWISE_CA": str(live_server.ca)}
    keys = live_server.keys.root_json.parent
    rotate = subprocess.run(edgewise_command("keys", "rotate", "--role", "targets", "--keys",
                                             str(keys)), env=env, capture_output=True,
                            text=True, timeout=120)
    assert rotate.returncode == 0, rotate.stderr
    publish = subprocess.run(edgewise_command("publish", str(make_tiny_bundle(
        tmp_path / "v2", version="2.0.0")), "--keys", str(keys), "--assign-all"), env=env,
        capture_output=True, text=True, timeout=120)
    assert publish.returncode == 0, publish.stderr
    assert run_once(state, tmp_path) == 0
    assert agent_status(state)["release"] == "tiny@2.0.0"
    assert (state / "tuf" / "root_history" / "2.root.json").exists()  # walked the root chain
