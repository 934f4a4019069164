"""The server on PostgreSQL (a throwaway cluster), end to end with a real agent."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from edgewise.agent import agent_status, enroll
from edgewise.server.client import OperatorClient, publish_bundle
from edgewise.sim import ServerProcess
from tests._postgres import pg_bin_dir, throwaway_postgres
from tests.conftest import make_tiny_bundle
from tests.test_e2e_update import run_once

pytestmark = pytest.mark.skipif(pg_bin_dir() is None and not __import__("os").environ.get("CI"),
                                reason="PostgreSQL binaries not installed")


@pytest.mark.slow
def test_update_cycle_on_postgresql(tmp_path: Path, keys) -> None:
    with throwaway_postgres() as url:
        token = secrets.token_urlsafe(24)
        server = ServerProcess(data_dir=tmp_path / "srv", root_path=keys.root_json,
                               online_key_path=keys.online_key, admin_token=token, db_url=url,
                               log_path=tmp_path / "server.log").start()
        try:
            with OperatorClient(server.url, token=token) as client:
                state = tmp_path / "agent"
                enroll(state, server_url=server.url, token=client.create_enrollment_token(),
                       root_path=keys.root_json, name="pg", hardware="test",
                       insecure_dev=True)
                release = publish_bundle(client, make_tiny_bundle(tmp_path / "b"),
                                         root_path=keys.root_json,
                                         targets_key_path=keys.targets_key)
                client.assign(release["id"])
                assert run_once(state, tmp_path) == 0
                assert agent_status(state)["state"] == "committed"
                (device,) = client.devices()
                assert device["state"] == "committed" and device["release_id"] == release["id"]
                assert len(client.events(device_id=device["id"])) >= 8
        finally:
            server.stop()
        assert "sqlite" not in (tmp_path / "server.log").read_text().lower()
        assert not (tmp_path / "srv" / "edgewise.db").exists()
