"""Replicas behind nginx (`edgewise server lb`): signed device requests pass through
unchanged, and a replica killed with SIGKILL costs the devices nothing (nginx sends its
requests to the other one). The whole rollout version of this is scenarios/replica-kill.yaml
(tests/test_sim_scenarios.py)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import httpx
import pytest

from edgewise.agent._client import enroll_device
from edgewise.server.client import OperatorClient
from edgewise.server.loadbalancer import LoadBalancer, nginx_config
from edgewise.sim import ServerProcess
from edgewise.sim._processes import free_port
from edgewise.trust._device_auth import new_device_key, public_key_hex, sign_request
from tests._postgres import pg_bin_dir, throwaway_postgres


def test_the_config_names_every_replica_and_refuses_bad_ones(tmp_path: Path) -> None:
    conf = nginx_config(listen="127.0.0.1:8080", prefix=tmp_path,
                        upstreams=["http://127.0.0.1:8001", "127.0.0.1:8002"])
    assert "server 127.0.0.1:8001 " in conf and "server 127.0.0.1:8002 " in conf
    assert "client_max_body_size 0;" in conf  # the application enforces its own limit
    with pytest.raises(ValueError, match="at least one upstream"):
        nginx_config(listen="127.0.0.1:8080", prefix=tmp_path, upstreams=[])
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        nginx_config(listen="127.0.0.1:8080", prefix=tmp_path, upstreams=["https://a:1"])
    with pytest.raises(ValueError, match="certificate and its key"):
        nginx_config(listen="127.0.0.1:8080", prefix=tmp_path, upstreams=["http://a:1"],
                     tls_cert=tmp_path / "c.pem")


@pytest.mark.slow
@pytest.mark.skipif(pg_bin_dir() is None and not os.environ.get("CI"),
                    reason="PostgreSQL binaries not installed")
def test_a_killed_replica_costs_the_devices_nothing(tmp_path: Path, keys) -> None:
    token = secrets.token_urlsafe(24)
    path = "/api/v1/device/assignment"
    with throwaway_postgres() as url:
        replicas = [ServerProcess(data_dir=tmp_path / "srv", root_path=keys.root_json,
                                  online_key_path=keys.online_key, admin_token=token,
                                  db_url=url, log_path=tmp_path / f"server{i}.log").start()
                    for i in range(2)]
        lb = LoadBalancer(listen=f"127.0.0.1:{free_port()}", prefix=tmp_path / "lb",
                          upstreams=[r.url for r in replicas]).start()
        try:
            with OperatorClient(lb.url, token=token) as admin:
                key, _ = new_device_key()
                device_id, _root = enroll_device(
                    lb.url, token=admin.create_enrollment_token(),
                    public_key=public_key_hex(key), name="d", hardware="test")

                def check_in() -> httpx.Response:
                    return httpx.get(lb.url + path, timeout=10, headers={
                        "Authorization": sign_request(key, device_id, "GET", path)})

                # Both replicas answer (round robin), and every signature verifies there.
                assert [check_in().status_code for _ in range(10)] == [200] * 10
                replayed = {"Authorization": sign_request(key, device_id, "GET", path)}
                assert httpx.get(lb.url + path, headers=replayed).status_code == 200
                assert httpx.get(lb.url + path, headers=replayed).status_code == 401

                replicas[0].proc.kill()
                replicas[0].proc.wait()
                assert [check_in().status_code for _ in range(10)] == [200] * 10
                body = b'{"state": "idle", "event": "checked", "message": "after the kill"}'
                report = httpx.post(lb.url + "/api/v1/device/reports", content=body,
                                    timeout=10, headers={
                                        "Content-Type": "application/json",
                                        "Authorization": sign_request(
                                            key, device_id, "POST", "/api/v1/device/reports",
                                            body)})
                assert report.status_code == 204, report.text
                events = admin.events(limit=100)
                assert any(e.get("message") == "after the kill" for e in events)
        finally:
            lb.stop()
            for replica in replicas:
                replica.stop()
