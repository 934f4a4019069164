"""The device check-in on plain SQL (`server/devices/checkin.py`) answers exactly what the
general path (the ORM services) says, and refuses what `require_device` refuses, on SQLite
and on PostgreSQL (where the replay guard is the shared `device_nonces` table)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from edgewise.agent._client import ServerClient
from edgewise.server.app import ServerConfig, create_app
from edgewise.server.devices import service
from edgewise.server.devices.models import Device, DeviceNonce
from edgewise.server.groups.models import Group, GroupMember
from edgewise.server.releases import service as releases
from edgewise.server.releases.models import Release, ReleaseVariant
from edgewise.server.rollouts.models import Rollout, RolloutDevice
from edgewise.trust import new_device_key, public_key_hex
from edgewise.trust._device_auth import REPLAY_HEADER, sign_request
from tests._postgres import pg_bin_dir, throwaway_postgres
from tests.conftest import ADMIN

PATH = "/api/v1/device/assignment"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(params=["sqlite", "postgresql"])
def app(request, tmp_path: Path, keys) -> Iterator[TestClient]:
    if request.param == "postgresql":
        if pg_bin_dir() is None and not os.environ.get("CI"):
            pytest.skip("PostgreSQL binaries not installed")
        with throwaway_postgres() as url, TestClient(create_app(ServerConfig(
                data_dir=tmp_path / "srv", root_path=keys.root_json,
                online_key_path=keys.online_key, admin_token=ADMIN, db_url=url))) as client:
            yield client
    else:
        with TestClient(create_app(ServerConfig(
                data_dir=tmp_path / "srv", root_path=keys.root_json,
                online_key_path=keys.online_key, admin_token=ADMIN))) as client:
            yield client


def enroll(api: TestClient, *, hardware: str = "generic", tags: list[str] | None = None):
    token = api.post("/api/v1/enrollment-tokens", json={}, headers=AUTH).json()["token"]
    key, _ = new_device_key()
    r = api.post("/api/v1/devices/enroll", json={"token": token, "public_key":
                                                 public_key_hex(key), "hardware": hardware,
                                                 "tags": tags or [], "timezone": "Europe/Oslo"})
    assert r.status_code == 201, r.text
    return r.json()["device_id"], key


def check_in(api: TestClient, device_id: str, key, **sign) -> dict:
    r = api.get(PATH, headers={"Authorization": sign_request(key, device_id, "GET", PATH,
                                                             **sign)})
    assert r.status_code == 200, r.text
    return r.json()


def reference(api: TestClient, device_id: str) -> dict:
    """What the ORM services say for this device (the general path's answer)."""
    with api.app.state.ctx.sessions() as session:
        device = session.get(Device, device_id)
        release = service.assignment(session, device=device)
        if release is None:
            return {"release_id": None, "name": None, "version": None, "manifest_target": None,
                    "window": None, "timezone": device.timezone, "rollout_id": None}
        build = releases.build_for(session, release=release, hardware=device.hardware)
        return {"release_id": release.id, "name": release.name, "version": build.version,
                "manifest_target": build.manifest_target,
                "window": service.effective_window(session, device=device),
                "timezone": device.timezone,
                "rollout_id": service.rollout_of(session, device=device)}


def test_the_answer_is_the_general_paths_in_every_case(app: TestClient) -> None:
    plain = enroll(app)
    variant = enroll(app, hardware="jetson")
    dynamic = enroll(app, tags=["site=lab"])
    static = enroll(app)
    own = enroll(app, tags=["site=lab"])
    unassigned = enroll(app)
    night = {"days": ["sat"], "start": "01:00", "end": "05:00"}
    lab = {"days": ["sun"], "start": "02:00", "end": "04:00"}
    with app.app.state.ctx.sessions() as session:
        for rid, version in (("rel-1", "1.0.0"), ("rel-2", "2.0.0")):
            session.add(Release(id=rid, name="m", version=version,
                                manifest_target=f"m/{version}/edgewise.json",
                                targets_version=1, size_bytes=1, manifest={}))
        session.flush()
        session.add(ReleaseVariant(release_id="rel-2", hardware="jetson", version="2.0.0-int8",
                                   manifest_target="m/2.0.0-int8/edgewise.json", size_bytes=1,
                                   manifest={}))
        session.add_all([Group(name="a-empty", kind="static", selector=[], window=None),
                         Group(name="b-lab", kind="dynamic", selector=["site=lab"], window=lab),
                         Group(name="c-night", kind="static", selector=[], window=night)])
        session.flush()
        session.add(GroupMember(group_name="c-night", device_id=static[0]))
        session.add(Rollout(id="ro-1", release_id="rel-2", group_name="b-lab", stages=[]))
        session.add(Rollout(id="ro-0", release_id="rel-1", group_name="b-lab", stages=[]))
        session.flush()
        session.add(RolloutDevice(rollout_id="ro-1", device_id=dynamic[0], position=0))
        session.add(RolloutDevice(rollout_id="ro-0", device_id=plain[0], position=0))
        for device_id, _key in (plain, variant, dynamic, static, own):
            session.get(Device, device_id).assigned_release_id = "rel-2"
        session.get(Device, plain[0]).assigned_release_id = "rel-1"
        session.get(Device, own[0]).window = night
        session.commit()

    answers = {name: check_in(app, *dev) for name, dev in (
        ("plain", plain), ("variant", variant), ("dynamic", dynamic), ("static", static),
        ("own", own), ("unassigned", unassigned))}
    for name, dev in (("plain", plain), ("variant", variant), ("dynamic", dynamic),
                      ("static", static), ("own", own), ("unassigned", unassigned)):
        assert answers[name] == reference(app, dev[0]), name
    # The cases are really different ones.
    assert answers["plain"]["rollout_id"] == "ro-0" and answers["plain"]["version"] == "1.0.0"
    assert answers["variant"]["version"] == "2.0.0-int8"
    assert answers["dynamic"]["window"] == lab and answers["dynamic"]["rollout_id"] == "ro-1"
    assert answers["static"]["window"] == night and answers["own"]["window"] == night
    assert answers["unassigned"]["release_id"] is None
    assert answers["plain"]["timezone"] == "Europe/Oslo"


def test_refusals_match_the_general_path(app: TestClient) -> None:
    device_id, key = enroll(app)
    header = {"Authorization": sign_request(key, device_id, "GET", PATH)}
    assert app.get(PATH, headers=header).status_code == 200
    replayed = app.get(PATH, headers=header)
    assert replayed.status_code == 401 and "replayed" in replayed.json()["detail"]

    other_key, _ = new_device_key()
    forged = app.get(PATH, headers={"Authorization": sign_request(other_key, device_id, "GET",
                                                                  PATH)})
    assert forged.status_code == 401 and "does not verify" in forged.json()["detail"]
    wrong_path = app.get(PATH, headers={"Authorization": sign_request(
        key, device_id, "GET", "/api/v1/device/reports")})
    assert wrong_path.status_code == 401
    stale = app.get(PATH, headers={"Authorization": sign_request(key, device_id, "GET", PATH,
                                                                 now=time.time() - 3600)})
    assert stale.status_code == 401 and "clock" in stale.json()["detail"]
    unknown = app.get(PATH, headers={"Authorization": sign_request(key, "dev-nobody", "GET",
                                                                   PATH)})
    assert unknown.status_code == 401 and "unknown device" in unknown.json()["detail"]
    assert app.get(PATH, headers={"Authorization": "Edgewise-Device id=x"}).status_code == 401

    assert app.post(f"/api/v1/devices/{device_id}/revoke", headers=AUTH).status_code == 200
    revoked = app.get(PATH, headers={"Authorization": sign_request(key, device_id, "GET",
                                                                   PATH)})
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]


def test_last_seen_is_written_at_a_coarse_resolution(app: TestClient) -> None:
    device_id, key = enroll(app)

    def last_seen():
        with app.app.state.ctx.sessions() as session:
            return session.get(Device, device_id).last_seen_at

    assert last_seen() is None
    check_in(app, device_id, key)
    first = last_seen()
    assert first is not None
    check_in(app, device_id, key)
    assert last_seen() == first  # within the resolution: no write
    with app.app.state.ctx.sessions() as session:
        session.get(Device, device_id).last_seen_at = first - service.LAST_SEEN_RESOLUTION \
            - timedelta(seconds=1)
        session.commit()
    check_in(app, device_id, key)
    assert last_seen() > first - timedelta(seconds=1)
    if app.app.state.ctx.engine.dialect.name == "postgresql":
        with app.app.state.ctx.sessions() as session:  # every nonce kept, shared by replicas
            assert session.scalar(select(func.count()).select_from(DeviceNonce).where(
                DeviceNonce.device_id == device_id)) == 3


class ResendingProxy(httpx.BaseTransport):
    """A load balancer whose first upstream took the request and died before answering:
    it sends the same bytes again (nginx's proxy_next_upstream) and returns that answer."""

    def __init__(self, upstream: httpx.BaseTransport) -> None:
        self.upstream = upstream
        self.sent: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.sent:
            self.sent.append(request.headers["authorization"])
            self.upstream.handle_request(request).read()  # taken; its answer is lost
        self.sent.append(request.headers["authorization"])
        return self.upstream.handle_request(request)


@pytest.mark.parametrize("path", [PATH, "/api/v1/device/reports"])
def test_a_request_resent_by_a_proxy_is_signed_anew_not_refused(app: TestClient,
                                                               path: str) -> None:
    device_id, key = enroll(app)
    proxy = ResendingProxy(app._transport)
    client = ServerClient("http://testserver", device_id=device_id, key=key, transport=proxy)
    if path == PATH:
        assert client.assignment() is None
    else:
        client.report({"state": "idle", "event": "heartbeat", "message": "after a resend"})
    assert len(proxy.sent) == 3 and proxy.sent[0] == proxy.sent[1] != proxy.sent[2]
    if path == PATH:  # a plain replay (someone else's copy) is still refused, and says why
        replayed = app.get(PATH, headers={"Authorization": proxy.sent[2]})
        assert replayed.status_code == 401
        assert replayed.headers[REPLAY_HEADER] == "replayed"
