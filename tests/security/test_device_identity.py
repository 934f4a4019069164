"""Device identity: a key pair generated on the device; every device request signed with it.

Against the real app in-process (TestClient): a forged, altered, stale or replayed request is
refused with 401 and changes nothing; the server stores only public keys."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from edgewise.trust import DeviceAuth, new_device_key, public_key_hex, sign_request
from tests.conftest import ADMIN


def _enroll(api: TestClient, name: str = "d"):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    token = api.post("/api/v1/enrollment-tokens", json={}, headers=admin).json()["token"]
    key, _ = new_device_key()
    r = api.post("/api/v1/devices/enroll",
                 json={"token": token, "name": name, "public_key": public_key_hex(key)})
    assert r.status_code == 201, r.text
    assert set(r.json()) == {"device_id", "director_root"}  # no secret: the device holds its key
    return r.json()["device_id"], key


def _events(api: TestClient, device_id: str) -> list[str]:
    r = api.get("/api/v1/events", params={"device_id": device_id},
                headers={"Authorization": f"Bearer {ADMIN}"})
    return [e["kind"] for e in r.json()]


REPORT = json.dumps({"state": "failed", "event": "error", "message": "x"}).encode()
JSON = {"Content-Type": "application/json"}


def test_signed_requests_work_and_forgeries_do_not(api: TestClient) -> None:
    device_id, key = _enroll(api)
    auth = DeviceAuth(device_id, key)
    assert api.get("/api/v1/device/assignment", auth=auth).status_code == 200
    # The query string is signed too (and a signature for one query fits no other).
    assert api.get("/api/v1/device/assignment", params={"a": "b c/d"},
                   auth=auth).status_code == 200
    signed = sign_request(key, device_id, "GET", "/api/v1/device/assignment?a=1")
    assert api.get("/api/v1/device/assignment?a=2",
                   headers={"Authorization": signed}).status_code == 401
    with api.app.state.ctx.sessions() as session:
        from edgewise.server.devices.models import Device

        assert session.get(Device, device_id).public_key == public_key_hex(key)

    def post(header: str, body: bytes = REPORT) -> httpx.Response:
        return api.post("/api/v1/device/reports", content=body,
                        headers={**JSON, "Authorization": header})

    other_key, _ = new_device_key()
    good = sign_request(key, device_id, "POST", "/api/v1/device/reports", REPORT)
    attacks = {
        "another key": sign_request(other_key, device_id, "POST", "/api/v1/device/reports",
                                    REPORT),
        "another path": sign_request(key, device_id, "POST", "/api/v1/device/feedback", REPORT),
        "another method": sign_request(key, device_id, "PUT", "/api/v1/device/reports", REPORT),
        "stale": sign_request(key, device_id, "POST", "/api/v1/device/reports", REPORT,
                              now=time.time() - 3600),
        "unknown device": sign_request(key, "dev-nope", "POST", "/api/v1/device/reports",
                                       REPORT),
        "malformed": good.replace("sig=", "sig=!"),
        "bearer": "Bearer " + public_key_hex(key),
    }
    for name, header in attacks.items():
        r = post(header)
        assert r.status_code == 401, (name, r.text)
    # The body is signed: the same header with another body is refused.
    altered = REPORT.replace(b'"x"', b'"y"')
    assert post(good, altered).status_code == 401
    assert post(good).status_code == 204
    r = post(good)  # replayed verbatim
    assert r.status_code == 401 and "replayed" in r.json()["detail"]
    assert _events(api, device_id) == ["enrolled", "error"]  # exactly one report got in


def test_a_key_enrolls_once_and_revocation_is_immediate(api: TestClient) -> None:
    device_id, key = _enroll(api)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    token = api.post("/api/v1/enrollment-tokens", json={}, headers=admin).json()["token"]
    r = api.post("/api/v1/devices/enroll", json={"token": token, "public_key":
                                                 public_key_hex(key)})
    assert r.status_code == 409 and "already enrolled" in r.json()["detail"]
    r = api.post("/api/v1/devices/enroll", json={"token": token, "public_key": "00" * 31})
    assert r.status_code == 422  # not a 32-byte key
    auth = DeviceAuth(device_id, key)
    assert api.get("/api/v1/device/assignment", auth=auth).status_code == 200
    api.post(f"/api/v1/devices/{device_id}/revoke", headers=admin)
    r = api.get("/api/v1/device/assignment", auth=auth)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


@pytest.mark.slow
def test_a_device_with_a_wrong_clock_learns_the_servers_time(live_server, enroll_agent) -> None:
    from edgewise.trust import client_tls
    from tests.conftest import device_auth

    device_id, auth = device_auth(enroll_agent("clock"))
    skewed = DeviceAuth(device_id, auth._key, clock=lambda: time.time() - 6 * 3600)
    with httpx.Client(base_url=live_server.url, verify=client_tls(live_server.ca),
                      auth=skewed, timeout=10) as http:
        assert http.get("/api/v1/device/assignment").status_code == 200
        assert skewed.offset_s == pytest.approx(6 * 3600, abs=5)
        assert http.get("/api/v1/device/assignment").status_code == 200  # no retry needed now
