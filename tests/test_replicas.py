"""Two server replicas on one PostgreSQL database: a signed device request is accepted once
whichever replica receives it, and rollout ticks run on one replica at a time."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from edgewise.agent._client import enroll_device
from edgewise.server._schema import _WORK_KEYS
from edgewise.server.client import OperatorClient, publish_bundle
from edgewise.sim import ServerProcess
from edgewise.trust._device_auth import new_device_key, public_key_hex, sign_request
from tests._postgres import pg_bin_dir, throwaway_postgres
from tests.conftest import make_tiny_bundle

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(pg_bin_dir() is None and not os.environ.get("CI"),
                                 reason="PostgreSQL binaries not installed")]


@pytest.fixture
def replicas(tmp_path: Path, keys) -> Iterator[tuple[str, list[ServerProcess], str]]:
    """Two server processes sharing one database and one artifact directory."""
    token = secrets.token_urlsafe(24)
    with throwaway_postgres() as url:
        servers = []
        try:
            for i in range(2):
                servers.append(ServerProcess(
                    data_dir=tmp_path / "srv", root_path=keys.root_json,
                    online_key_path=keys.online_key, admin_token=token, db_url=url,
                    rollout_tick_s=0.3, log_path=tmp_path / f"server{i}.log").start())
            yield url, servers, token
        finally:
            for server in servers:
                server.stop()


def enroll(server: ServerProcess, admin: OperatorClient, tags: list[str] | None = None):
    key, _pem = new_device_key()
    device_id, _root = enroll_device(server.url, token=admin.create_enrollment_token(),
                                     public_key=public_key_hex(key), name="d", hardware="test",
                                     tags=tags)
    return device_id, key


def test_a_request_replayed_to_the_other_replica_is_refused(replicas) -> None:
    _url, (a, b), token = replicas
    with OperatorClient(a.url, token=token) as admin:
        device_id, key = enroll(a, admin)
    path = "/api/v1/device/assignment"
    header = {"Authorization": sign_request(key, device_id, "GET", path)}
    assert httpx.get(a.url + path, headers=header, timeout=10).status_code == 200
    replayed = httpx.get(b.url + path, headers=header, timeout=10)
    assert replayed.status_code == 401 and "replayed" in replayed.json()["detail"]
    # A fresh signature is fine on either.
    for server in (a, b):
        fresh = {"Authorization": sign_request(key, device_id, "GET", path)}
        assert httpx.get(server.url + path, headers=fresh, timeout=10).status_code == 200


def test_rollout_ticks_wait_for_the_replica_holding_the_lock(replicas, tmp_path: Path,
                                                            keys) -> None:
    url, (a, _b), token = replicas
    with OperatorClient(a.url, token=token) as admin:
        devices = [enroll(a, admin, tags=["site=lab"])[0] for _ in range(2)]
        release = publish_bundle(admin, make_tiny_bundle(tmp_path / "b"),
                                 root_path=keys.root_json, targets_key_path=keys.targets_key)
        admin.request("POST", "/api/v1/groups", json={"name": "lab", "kind": "dynamic",
                                                      "selector": ["site=lab"]})
        # Another replica is ticking (this test holds the tick's lock): nobody else may.
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                             autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (_WORK_KEYS["rollout-tick"],))
            rollout = admin.request("POST", "/api/v1/rollouts", json={
                "release_id": release["id"], "group": "lab",
                "stages": "canary:1,broad:100%"}).json()
            time.sleep(2.0)  # ~6 ticks of each replica
            assert [d["assigned_release_id"] for d in admin.devices()] == [None, None]
        # The lock is free again: the next tick of either replica assigns the canary, once.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assigned = [e for e in admin.events(limit=1000)
                        if e["kind"] == "assigned" and e.get("rollout_id") == rollout["id"]]
            if assigned:
                break
            time.sleep(0.2)
        time.sleep(1.0)  # more ticks: still one canary assignment
        assigned = [e for e in admin.events(limit=1000)
                    if e["kind"] == "assigned" and e.get("rollout_id") == rollout["id"]]
        assert len(assigned) == 1 and assigned[0]["device_id"] in devices


def test_each_event_is_announced_once_by_one_replica(replicas, tmp_path: Path, keys) -> None:
    from http.server import ThreadingHTTPServer

    from tests.test_notifications import _Receiver

    url, (a, b), token = replicas
    _Receiver.calls, _Receiver.fail_first = [], 0
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        with OperatorClient(b.url, token=token) as admin:
            hook = admin.request("POST", "/api/v1/webhooks", json={
                "url": f"http://127.0.0.1:{receiver.server_address[1]}/hook",
                "events": ["published"]}).json()
            with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                                 autocommit=True) as holder:
                holder.execute("SELECT pg_advisory_lock(%s)", (_WORK_KEYS["notify"],))
                for i in range(3):
                    publish_bundle(admin, make_tiny_bundle(tmp_path / f"b{i}",
                                                           version=f"1.0.{i}"),
                                   root_path=keys.root_json, targets_key_path=keys.targets_key)
                time.sleep(2.0)  # ~4 notification ticks of each replica
                assert _Receiver.calls == []  # the replica holding the lock is busy elsewhere
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(_Receiver.calls) < 3:
                time.sleep(0.2)
            time.sleep(1.5)  # more ticks of both replicas: nothing is sent twice
            deliveries = admin.request("GET", f"/api/v1/webhooks/{hook['id']}/deliveries").json()
        ids = sorted(json.loads(body)["event_id"] for _headers, body in _Receiver.calls)
        assert len(ids) == 3 == len(set(ids)) == len(deliveries)
    finally:
        receiver.shutdown()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_server_run_with_two_workers_serves_a_whole_update(tmp_path: Path, keys) -> None:
    from edgewise.agent import agent_status
    from edgewise.agent import enroll as enroll_agent
    from tests.test_e2e_update import run_once

    token = secrets.token_urlsafe(24)
    with throwaway_postgres() as url:
        server = ServerProcess(data_dir=tmp_path / "srv", root_path=keys.root_json,
                               online_key_path=keys.online_key, admin_token=token,
                               db_url=url, log_path=tmp_path / "server.log",
                               extra_args=("--workers", "2")).start()
        try:
            workers = [p for p in _children(server.proc.pid)
                       if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
            assert len(workers) == 2, workers
            with OperatorClient(server.url, token=token) as admin:
                state = tmp_path / "agent"
                enroll_agent(state, server_url=server.url, token=admin.create_enrollment_token(),
                             root_path=keys.root_json, name="w", hardware="test",
                             insecure_dev=True)
                release = publish_bundle(admin, make_tiny_bundle(tmp_path / "b"),
                                         root_path=keys.root_json,
                                         targets_key_path=keys.targets_key)
                admin.assign(release["id"])
                assert run_once(state, tmp_path) == 0
                assert agent_status(state)["state"] == "committed"
                (device,) = admin.devices()
                assert device["state"] == "committed"
        finally:
            server.stop()


def test_several_workers_need_postgresql(tmp_path: Path, keys) -> None:
    import subprocess

    from edgewise.sim import edgewise_command

    result = subprocess.run(edgewise_command(
        "server", "run", "--data", str(tmp_path / "srv"), "--root", str(keys.root_json),
        "--online-key", str(keys.online_key), "--insecure-dev", "--workers", "2"),
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "needs a PostgreSQL database" in result.stderr


def test_metrics_count_every_workers_requests(tmp_path: Path, keys) -> None:
    token = secrets.token_urlsafe(24)
    with throwaway_postgres() as url:
        server = ServerProcess(data_dir=tmp_path / "srv", root_path=keys.root_json,
                               online_key_path=keys.online_key, admin_token=token,
                               db_url=url, log_path=tmp_path / "server.log",
                               extra_args=("--workers", "2")).start()
        try:
            with OperatorClient(server.url, token=token) as admin:
                device_id, key = enroll(server, admin)
            path = "/api/v1/device/reports"
            for i in range(12):  # new connections: the kernel spreads them over the workers
                body = json.dumps({"state": "idle", "event": "checked",
                                   "message": f"report {i}"}).encode()
                r = httpx.post(server.url + path, content=body, timeout=10, headers={
                    "Content-Type": "application/json",
                    "Authorization": sign_request(key, device_id, "POST", path, body)})
                assert r.status_code == 204, r.text
            for _ in range(6):  # whichever worker answers the scrape counts them all
                text = httpx.get(server.url + "/metrics", timeout=10,
                                 headers={"Authorization": f"Bearer {token}"}).text
                line = next(x for x in text.splitlines()
                            if x.startswith('edgewise_device_reports_total{event="checked"}'))
                assert float(line.split()[-1]) == 12.0, line
                assert 'edgewise_devices{release_id="none",state="idle"} 1.0' in text
        finally:
            server.stop()
