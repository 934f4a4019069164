"""The server's API contract with operators and devices, in-process (FastAPI TestClient on
the real app, a real SQLite file and a real TUF repository)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from edgewise.server.client import OperatorClient, ServerApiError, publish_bundle
from edgewise.trust import DeviceAuth, VerificationError, new_device_key, public_key_hex
from tests.conftest import ADMIN


def admin(api: TestClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def _enroll_body(token: str, **extra) -> dict:
    return {"token": token, "public_key": public_key_hex(new_device_key()[0]), **extra}


def enroll(api: TestClient, name: str = "d") -> tuple[str, DeviceAuth]:
    token = api.post("/api/v1/enrollment-tokens", json={}, headers=admin(api)).json()["token"]
    key, _ = new_device_key()
    body = api.post("/api/v1/devices/enroll", json={"token": token, "name": name,
                                                    "public_key": public_key_hex(key)}).json()
    return body["device_id"], DeviceAuth(body["device_id"], key)


def test_openapi_docs_are_served(api: TestClient) -> None:
    assert api.get("/docs").status_code == 200
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/api/v1/devices/enroll", "/api/v1/releases", "/api/v1/device/assignment",
            "/tuf/metadata/{filename}"} <= set(paths)


@pytest.mark.parametrize("path", ["/api/v1/devices", "/api/v1/releases", "/api/v1/events"])
def test_admin_routes_need_the_admin_token(api: TestClient, path: str) -> None:
    assert api.get(path).status_code == 401
    assert api.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert api.get(path, headers=admin(api)).status_code == 200


def test_enrollment_token_is_single_use(api: TestClient) -> None:
    token = api.post("/api/v1/enrollment-tokens", json={}, headers=admin(api)).json()["token"]
    assert api.post("/api/v1/devices/enroll", json=_enroll_body(token)).status_code == 201
    second = api.post("/api/v1/devices/enroll", json=_enroll_body(token))
    assert second.status_code == 401 and "already used" in second.json()["detail"]
    unknown = api.post("/api/v1/devices/enroll", json=_enroll_body("x" * 20))
    assert unknown.status_code == 401


def test_expired_enrollment_token(api: TestClient) -> None:
    from datetime import timedelta

    from edgewise.server._auth import hash_token
    from edgewise.server._db import utcnow
    from edgewise.server.devices.models import EnrollmentToken

    with api.app.state.ctx.sessions() as session:
        session.add(EnrollmentToken(token_hash=hash_token("expired-token-123"),
                                    expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    r = api.post("/api/v1/devices/enroll", json=_enroll_body("expired-token-123"))
    assert r.status_code == 401 and "expired" in r.json()["detail"]


def test_device_routes_need_a_device_credential(api: TestClient) -> None:
    assert api.get("/api/v1/device/assignment").status_code == 401
    bad = {"Authorization": "Bearer not-a-device"}
    assert api.get("/api/v1/device/assignment", headers=bad).status_code == 401
    # The admin token is not a device credential either.
    assert api.get("/api/v1/device/assignment", headers=admin(api)).status_code == 401
    _, creds = enroll(api)
    assert api.get("/api/v1/device/assignment", auth=creds).json()["release_id"] is None


def test_reports_are_validated_and_logged(api: TestClient) -> None:
    device_id, creds = enroll(api)
    r = api.post("/api/v1/device/reports", auth=creds,
                 json={"state": "exploded", "event": "x"})
    assert r.status_code == 409
    r = api.post("/api/v1/device/reports", auth=creds,
                 json={"state": "failed", "event": "error", "release_id": "rel-nope"})
    assert r.status_code == 404
    r = api.post("/api/v1/device/reports", auth=creds,
                 json={"state": "failed", "event": "error", "message": "disk full"})
    assert r.status_code == 204
    events = api.get("/api/v1/events", params={"device_id": device_id}, headers=admin(api))
    assert [e["kind"] for e in events.json()] == ["enrolled", "error"]
    assert api.get(f"/api/v1/devices/{device_id}", headers=admin(api)).json()["state"] == "failed"


def test_a_batch_of_reports_is_applied_in_order_all_or_none(api: TestClient) -> None:
    device_id, creds = enroll(api)
    batch = [{"state": "downloading", "event": "update-available"},
             {"state": "failed", "event": "error", "message": "disk full"},
             {"state": "idle", "event": "no-update"}]
    assert api.post("/api/v1/device/reports", auth=creds, json=batch).status_code == 204
    events = api.get("/api/v1/events", params={"device_id": device_id}, headers=admin(api))
    assert [e["kind"] for e in events.json()] == ["enrolled", "update-available", "error",
                                                 "no-update"]
    assert api.get(f"/api/v1/devices/{device_id}", headers=admin(api)).json()["state"] == "idle"
    # One bad report refuses the whole batch: nothing of it is applied.
    bad = [{"state": "downloading", "event": "update-available"},
           {"state": "failed", "event": "error", "release_id": "rel-nope"}]
    assert api.post("/api/v1/device/reports", auth=creds, json=bad).status_code == 404
    assert len(api.get("/api/v1/events", params={"device_id": device_id},
                       headers=admin(api)).json()) == 4
    assert api.get(f"/api/v1/devices/{device_id}", headers=admin(api)).json()["state"] == "idle"
    for size in (0, 101):
        r = api.post("/api/v1/device/reports", auth=creds,
                     json=[{"state": "idle", "event": "no-update"}] * size)
        assert r.status_code == 422, size


def test_assign_unknown_release_or_device(api: TestClient) -> None:
    r = api.post("/api/v1/assignments", json={"release_id": "rel-x"}, headers=admin(api))
    assert r.status_code == 404


def _operator(api: TestClient) -> OperatorClient:
    client = OperatorClient("http://testserver", token=ADMIN)
    client.http = api  # TestClient is an httpx.Client talking to the app in-process
    client.http.headers["Authorization"] = f"Bearer {ADMIN}"
    return client


def test_publish_creates_a_release_and_signed_targets(api: TestClient, keys, tiny_bundle) -> None:
    client = _operator(api)
    release = publish_bundle(client, tiny_bundle("1.0.0"), root_path=keys.root_json,
                             targets_key_path=keys.targets_key)
    assert release["id"].startswith("rel-") and release["manifest_target"] == \
        "tiny/1.0.0/edgewise.json"
    assert api.get("/tuf/metadata/1.root.json").status_code == 200
    assert api.get("/tuf/metadata/timestamp.json").status_code == 200
    assert api.get("/tuf/metadata/1.targets.json").status_code == 200
    assert api.get("/tuf/metadata/../../etc/passwd").status_code == 404
    # Publishing the same version again is a conflict; a second version gets a new id.
    # (Refused on the operator's side when the bytes differ, by the server when they do not.)
    with pytest.raises((ServerApiError, VerificationError), match="already"):
        publish_bundle(client, tiny_bundle("1.0.0"), root_path=keys.root_json,
                       targets_key_path=keys.targets_key)
    second = publish_bundle(client, tiny_bundle("1.1.0"), root_path=keys.root_json,
                            targets_key_path=keys.targets_key)
    assert second["id"] != release["id"] and second["targets_version"] == 2


def test_publish_refuses_uploads_that_do_not_match(api: TestClient, keys, tiny_bundle) -> None:
    from edgewise.trust import load_root, load_signer, sign_targets, target_file

    bundle = tiny_bundle("1.0.0")
    add = {f"tiny/1.0.0/{p.name}": target_file(f"tiny/1.0.0/{p.name}", p)
           for p in bundle.iterdir()}
    signed = sign_targets(root=load_root(keys.root_json), signer=load_signer(keys.targets_key),
                          current=None, add=add)
    # Signed, but the model's bytes are not uploaded.
    files = [("files", (n, (bundle / n.split("/")[-1]).read_bytes())) for n in add
             if not n.endswith("model.onnx")]
    r = api.post("/api/v1/releases", headers=admin(api),
                 files=[("targets", ("t.json", signed)), *files])
    assert r.status_code == 422 and "not uploaded" in r.json()["detail"]
    # Garbage metadata.
    r = api.post("/api/v1/releases", headers=admin(api),
                 files=[("targets", ("t.json", b"{nope")), *files])
    assert r.status_code == 422
    assert api.get("/api/v1/releases", headers=admin(api)).json() == []


def test_a_failure_the_device_will_retry_is_not_an_outcome(api: TestClient, keys,
                                                           tiny_bundle) -> None:
    from edgewise.server.devices.models import InstallResult

    release = publish_bundle(_operator(api), tiny_bundle("1.0.0"), root_path=keys.root_json,
                             targets_key_path=keys.targets_key)
    device_id, creds = enroll(api)
    body = {"state": "failed", "event": "error", "target_release_id": release["id"],
            "message": "connection reset", "detail": {"attempt": 1, "will_retry": True}}
    assert api.post("/api/v1/device/reports", auth=creds, json=body).status_code == 204
    with api.app.state.ctx.sessions() as session:
        assert session.get(InstallResult, (device_id, release["id"])).outcome == "retrying"
    body["detail"] = {"attempt": 3, "will_retry": False}
    assert api.post("/api/v1/device/reports", auth=creds, json=body).status_code == 204
    with api.app.state.ctx.sessions() as session:
        assert session.get(InstallResult, (device_id, release["id"])).outcome == "failed"


def test_metadata_is_served_with_etags_and_changes_are_seen_at_once(api: TestClient, keys,
                                                                    tiny_bundle) -> None:
    client = _operator(api)
    publish_bundle(client, tiny_bundle("1.0.0"), root_path=keys.root_json,
                   targets_key_path=keys.targets_key)
    first = api.get("/tuf/metadata/timestamp.json")
    etag = first.headers["etag"]
    assert first.status_code == 200 and first.headers["cache-control"] == "no-cache"
    # Unchanged: 304 and no body for whoever kept the tag (a mirror, a CDN).
    again = api.get("/tuf/metadata/timestamp.json", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert api.get("/tuf/metadata/timestamp.json",
                   headers={"If-None-Match": '"other", W/' + etag}).status_code == 304
    versioned = api.get("/tuf/metadata/1.targets.json")
    assert "immutable" in versioned.headers["cache-control"]
    # A publish replaces timestamp.json: the next request gets the new file, never the
    # cached one, and the old tag no longer matches.
    publish_bundle(client, tiny_bundle("1.1.0"), root_path=keys.root_json,
                   targets_key_path=keys.targets_key)
    newer = api.get("/tuf/metadata/timestamp.json", headers={"If-None-Match": etag})
    assert newer.status_code == 200 and newer.headers["etag"] != etag
    on_disk = (api.app.state.ctx.repo.metadata_dir / "timestamp.json").read_bytes()
    assert newer.content == on_disk != first.content
    assert api.get("/tuf/metadata/9.targets.json").status_code == 404
