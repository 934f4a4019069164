"""Attacks on the server's API and channels, each against the real server over TLS with real
agents: the attack fails AND the device keeps running its previous release."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest

from edgewise.agent import AgentConfigError, agent_status, enroll
from edgewise.server.client import OperatorClient, ServerApiError
from edgewise.sim import edgewise_command
from edgewise.trust import DeviceAuth, client_tls, init_certs
from tests.conftest import device_auth, make_tiny_bundle
from tests.test_e2e_update import run_once

pytestmark = pytest.mark.slow


def _device(state: Path) -> tuple[str, DeviceAuth]:
    return device_auth(state)


@pytest.fixture
def running(live_server, enroll_agent, tmp_path: Path):
    """Two devices running v1."""
    a, b = enroll_agent("a"), enroll_agent("b")
    v1 = live_server.publish(make_tiny_bundle(tmp_path / "v1"))
    assert run_once(a, tmp_path) == 0 and run_once(b, tmp_path) == 0
    return a, b, v1


def _http(live_server) -> httpx.Client:
    return httpx.Client(base_url=live_server.url, verify=client_tls(live_server.ca), timeout=10)


def test_device_cannot_read_or_write_another_devices_records(live_server, running) -> None:
    a, b, v1 = running
    a_id, a_auth = _device(a)
    b_id, b_auth = _device(b)
    with _http(live_server) as http:
        # There is no way to name another device: the credential is the identity.
        assert http.get("/api/v1/device/assignment", auth=b_auth,
                        params={"device_id": a_id}).json()["release_id"] == v1["id"]
        r = http.post("/api/v1/device/reports", auth=b_auth,
                      json={"state": "failed", "event": "error", "message": "spoof",
                            "detail": {"device_id": a_id}})
        assert r.status_code == 204
        # Device routes of the operator API are closed to device credentials.
        assert http.get(f"/api/v1/devices/{a_id}", auth=b_auth).status_code == 401
        assert http.post("/api/v1/assignments", auth=b_auth,
                         json={"release_id": v1["id"]}).status_code == 401
    with live_server.client() as c:
        devices = {d["id"]: d for d in c.devices()}
    assert devices[a_id]["state"] == "committed"  # untouched by b's report
    assert devices[b_id]["state"] == "failed"  # b only ever changes b
    assert agent_status(a)["release"] == "tiny@1.0.0"


@pytest.mark.parametrize(("role", "allowed"), [
    ("viewer", {"read"}),
    ("publisher", {"read", "targets"}),
    ("operator", {"read", "assign", "token"}),
])
def test_operator_roles_are_checked_on_every_route(live_server, running, role: str,
                                                   allowed: set[str]) -> None:
    a, b, v1 = running
    with live_server.client() as admin:
        token = admin.request("POST", "/api/v1/tokens",
                              json={"name": f"{role}-user", "role": role}).json()["token"]
    calls = {
        "read": ("GET", "/api/v1/devices", None),
        "assign": ("POST", "/api/v1/assignments", {"release_id": v1["id"]}),
        "token": ("POST", "/api/v1/enrollment-tokens", {}),
        "targets": ("GET", "/api/v1/tuf/targets-metadata", None),
        "admin": ("POST", "/api/v1/tokens", {"name": "x", "role": "admin"}),
    }
    with _http(live_server) as http:
        for name, (method, path, body) in calls.items():
            r = http.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"})
            expected = name in allowed
            assert (r.status_code < 400) == expected, (role, name, r.status_code, r.text)
            if not expected:
                assert r.status_code == 403
            anon = http.request(method, path, json=body)
            assert anon.status_code == 401


def test_reused_and_expired_enrollment_tokens(live_server, tmp_path: Path) -> None:
    with live_server.client() as c:
        token = c.create_enrollment_token()
    enroll(tmp_path / "first", server_url=live_server.url, token=token,
           root_path=live_server.keys.root_json, name="first", hardware="t",
           ca_path=live_server.ca)
    with pytest.raises(AgentConfigError, match="already used"):
        enroll(tmp_path / "second", server_url=live_server.url, token=token,
               root_path=live_server.keys.root_json, name="second", hardware="t",
               ca_path=live_server.ca)
    db = sqlite3.connect(live_server.data_dir / "edgewise.db")
    with live_server.client() as c:
        token = c.create_enrollment_token()
    db.execute("UPDATE enrollment_tokens SET expires_at = '2000-01-01 00:00:00' "
               "WHERE used_at IS NULL")
    db.commit()
    with pytest.raises(AgentConfigError, match="expired"):
        enroll(tmp_path / "third", server_url=live_server.url, token=token,
               root_path=live_server.keys.root_json, name="third", hardware="t",
               ca_path=live_server.ca)
    assert not (tmp_path / "second" / "identity.json").exists()


def test_revoked_device_is_cut_off_at_once_and_keeps_its_model(live_server, running,
                                                              tmp_path: Path) -> None:
    a, b, v1 = running
    a_id, a_auth = _device(a)
    with live_server.client() as c:
        c.request("POST", f"/api/v1/devices/{a_id}/revoke")
    with _http(live_server) as http:
        assert http.get("/api/v1/device/assignment", auth=a_auth).status_code == 401
    proc = subprocess.run(edgewise_command("agent", "run", "--state", str(a), "--once"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "rejected this device" in proc.stderr
    assert agent_status(a)["release"] == "tiny@1.0.0"  # still serving its model locally


def test_man_in_the_middle_with_another_ca_is_refused(live_server, tmp_path: Path) -> None:
    mitm_ca = init_certs(tmp_path / "mitm", hostnames=["127.0.0.1"]).ca_cert
    with live_server.client() as c:
        token = c.create_enrollment_token()
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        enroll(tmp_path / "pinned-wrong", server_url=live_server.url, token=token,
               root_path=live_server.keys.root_json, name="x", hardware="t", ca_path=mitm_ca)
    with pytest.raises(ServerApiError, match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
        OperatorClient(live_server.url, token=live_server.admin_token, verify=mitm_ca).devices()


def test_plain_http_needs_an_explicit_development_flag(live_server, tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="refusing plain HTTP"):
        enroll(tmp_path / "plain", server_url="http://127.0.0.1:9", token="x" * 20,
               root_path=live_server.keys.root_json, name="x", hardware="t")
    proc = subprocess.run(edgewise_command(
        "server", "run", "--data", str(tmp_path / "d"), "--root",
        str(live_server.keys.root_json), "--online-key", str(live_server.keys.online_key),
        "--port", "9"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "refusing to serve plain HTTP" in proc.stderr


def test_audit_log_records_mutations_and_detects_tampering(live_server, running) -> None:
    from edgewise.server.audit.service import verify_chain

    with live_server.client() as c:
        entries = c.request("GET", "/api/v1/audit").json()
        assert c.request("GET", "/api/v1/audit/verify").json()["ok"] is True
    kinds = {(e["method"], e["path"].split("/")[3], e["actor"].split(":")[0]) for e in entries}
    assert ("POST", "releases", "operator") in kinds  # the publish
    assert ("POST", "devices", "anonymous") in kinds  # enrollment
    assert ("POST", "device", "device") in kinds  # agents' reports
    assert all(e["client"] == "127.0.0.1" for e in entries)
    assert verify_chain(entries)[0]
    # Someone with database access rewrites history...
    db = sqlite3.connect(live_server.data_dir / "edgewise.db")
    victim = entries[len(entries) // 2]["id"]
    db.execute("UPDATE audit_log SET actor = 'operator:nobody(admin)' WHERE id = ?", (victim,))
    db.commit()
    with live_server.client() as c:
        result = c.request("GET", "/api/v1/audit/verify").json()
        tampered = c.request("GET", "/api/v1/audit").json()
    assert result == {"ok": False, "entries": result["entries"], "first_bad_id": victim,
                      "reason": result["reason"]}
    assert verify_chain(tampered)[1] == victim
    # ... or deletes an entry.
    db.execute("DELETE FROM audit_log WHERE id = ?", (victim + 1,))
    db.commit()
    with live_server.client() as c:
        remaining = c.request("GET", "/api/v1/audit").json()
    fixed = [e if e["id"] != victim else next(x for x in entries if x["id"] == victim)
             for e in remaining]
    assert verify_chain(fixed)[1] == victim + 2


@pytest.mark.parametrize(("path", "body"), [
    ("/api/v1/devices/enroll", b"{not json"),
    ("/api/v1/devices/enroll", b'{"token": 5}'),
    ("/api/v1/device/reports", b'["a"]'),
    ("/api/v1/rollouts", b'{"release_id": null}'),
])
def test_malformed_json_is_refused_cleanly(live_server, running, path: str,
                                           body: bytes) -> None:
    a, b, v1 = running
    _, a_auth = _device(a)
    headers = {"Content-Type": "application/json"}
    auth = a_auth
    if path == "/api/v1/rollouts":
        headers["Authorization"] = f"Bearer {live_server.admin_token}"
        auth = None
    with _http(live_server) as http:
        r = http.post(path, content=body, headers=headers, auth=auth)
    assert r.status_code == 422, r.text
    assert agent_status(a)["release"] == "tiny@1.0.0"
