"""TUF metadata written by several server processes on one repository (replicas): each write
holds the lock they share (`server._schema.serialized`: a file lock on SQLite, an advisory lock
on PostgreSQL), so an aging timestamp is re-signed once, whoever notices first, and a root one
replica accepted is the root the others verify against."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from tuf.api.metadata import Metadata, Timestamp

from edgewise.server._schema import serialized
from edgewise.trust import ServerRepository, load_signer, rotate_keys
from tests._postgres import pg_bin_dir, throwaway_postgres
from tests.security.test_key_management import World


class SlowSigner:
    """The online key, slow enough that two unserialized signers overlap."""

    def __init__(self, signer, delay_s: float = 0.3) -> None:
        self._signer = signer
        self.public_key = signer.public_key
        self._delay_s = delay_s

    def sign(self, payload: bytes):
        time.sleep(self._delay_s)
        return self._signer.sign(payload)


@pytest.fixture(params=["file lock", "advisory lock", "none"])
def lock(request, tmp_path: Path):
    if request.param == "none":
        yield None
    elif request.param == "file lock":
        engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
        yield partial(serialized, engine, "tuf-metadata", lock_file=tmp_path / "repo.lock")
    else:
        if pg_bin_dir() is None and not os.environ.get("CI"):
            pytest.skip("PostgreSQL binaries not installed")
        with throwaway_postgres() as url:
            engine = create_engine(url)
            yield partial(serialized, engine, "tuf-metadata", lock_file=tmp_path / "unused")
            engine.dispose()


def replicas(world: World, lock, n: int = 2) -> list[ServerRepository]:
    return [ServerRepository(world.tmp / "repo", root=world.keys.root_json.read_bytes(),
                             online_signer=SlowSigner(load_signer(world.keys.online_key)),
                             serialize=lock) for _ in range(n)]


def timestamp_version(world: World) -> int:
    path = world.tmp / "repo" / "metadata" / "timestamp.json"
    return Metadata[Timestamp].from_bytes(path.read_bytes()).signed.version


def test_an_aging_timestamp_is_signed_once_across_replicas(tmp_path: Path, lock) -> None:
    world = World(tmp_path)
    world.publish("m/1/model.onnx", b"\x08one")
    before = timestamp_version(world)
    later = datetime.now(UTC) + timedelta(hours=20)  # past half of the timestamp's day
    start = threading.Barrier(2)
    signed: list[bool] = []

    def refresh(repo: ServerRepository) -> None:
        start.wait()
        signed.append(repo.refresh_online_metadata(now=later))

    threads = [threading.Thread(target=refresh, args=(r,)) for r in replicas(world, lock)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if lock is None:  # without the shared lock both sign the same next version
        assert signed == [True, True]
        return
    assert sorted(signed) == [False, True]
    assert timestamp_version(world) == before + 1
    assert world.device_download("m/1/model.onnx") == b"\x08one"


def test_a_root_one_replica_accepted_is_the_others_root(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.publish("m/1/model.onnx", b"\x08one")
    lock = partial(serialized, create_engine(f"sqlite:///{tmp_path / 'x.db'}"), "tuf-metadata",
                   lock_file=tmp_path / "repo.lock")
    first, second = replicas(world, lock)
    old, new = rotate_keys(world.keys_dir, role="targets")
    first.add_root(new.to_bytes())
    world.repo = second  # the next publish, signed with the new targets key, reaches the other
    world.publish("", b"", current_root=old)
    world.publish("m/2/model.onnx", b"\x08two")
    assert second.root.signed.version == 2
    assert world.device_download("m/2/model.onnx") == b"\x08two"
