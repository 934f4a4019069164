"""The agent's control-plane client (assignment, reports, enrollment) over httpx."""

from __future__ import annotations

import json
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..artifacts import MODEL_COMPONENT
from ..trust._device_auth import DeviceAuth
from ._errors import AgentConfigError, AgentTransportError
from ._store import ReleaseRef

__all__ = ["ServerClient", "enroll_device"]


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text[:200]


def enroll_device(server_url: str, *, token: str, public_key: str, name: str, hardware: str,
                  tags: list[str] | None = None, timezone: str = "UTC",
                  verify=True, timeout_s: float = 10.0) -> tuple[str, bytes]:
    """Exchange a single-use enrollment token and our public key for a device id and the
    director's root metadata."""
    try:
        r = httpx.post(f"{server_url.rstrip('/')}/api/v1/devices/enroll", timeout=timeout_s,
                       verify=verify,
                       json={"token": token, "public_key": public_key, "name": name,
                             "hardware": hardware, "tags": tags or [], "timezone": timezone})
    except httpx.HTTPError as exc:
        raise AgentTransportError(f"cannot reach {server_url}: {exc}") from exc
    if r.status_code != 201:
        raise AgentConfigError(f"enrollment refused (HTTP {r.status_code}): {_detail(r)}")
    body = r.json()
    return body["device_id"], json.dumps(body["director_root"]).encode()


class ServerClient:
    def __init__(self, server_url: str, *, device_id: str, key: Ed25519PrivateKey,
                 timeout_s: float = 10.0, verify: str | bool = True,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = server_url.rstrip("/")
        # Every request is signed with the device's key (trust._device_auth).
        # `transport`: the network seam (the simulator's profiles); None is httpx's own.
        self.http = httpx.Client(timeout=timeout_s, auth=DeviceAuth(device_id, key),
                                 verify=verify, transport=transport)

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = self.http.request(method, f"{self.base_url}{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise AgentTransportError(f"{method} {path}: {exc}") from exc
        if r.status_code == 401:
            raise AgentConfigError(f"the server rejected this device: {_detail(r)}")
        if r.status_code >= 400:
            raise AgentTransportError(f"{method} {path}: HTTP {r.status_code}: {_detail(r)}",
                                      status_code=r.status_code)
        return r

    def assignment(self) -> ReleaseRef | None:
        """The model component's assignment (what older servers send alone)."""
        return self.assignments().get(MODEL_COMPONENT)

    def assignments(self) -> dict[str, ReleaseRef]:
        """Component -> the release the server wants this device to run there."""
        body = self._request("GET", "/api/v1/device/assignment").json()
        wanted = {}
        for item in [body, *(body.get("components") or [])]:
            if item.get("release_id"):
                ref = ReleaseRef(
                    release_id=item["release_id"], name=item["name"], version=item["version"],
                    manifest_target=item["manifest_target"], window=item.get("window"),
                    timezone=item.get("timezone") or "UTC", rollout_id=item.get("rollout_id"),
                    component=item.get("component") or MODEL_COMPONENT)
                wanted[ref.component] = ref
        return wanted

    def feedback(self, item: dict[str, Any]) -> None:
        self._request("POST", "/api/v1/device/feedback", json=item)

    def drift(self, summary: dict[str, Any]) -> None:
        self._request("POST", "/api/v1/device/drift", json=summary)

    def report(self, report: dict[str, Any]) -> None:
        self._request("POST", "/api/v1/device/reports", json=report)

    def reports(self, reports: list[dict[str, Any]]) -> None:
        """Several reports in one request, applied by the server in order, all or none."""
        self._request("POST", "/api/v1/device/reports", json=reports)
