"""The operator's client of the server API: publish signed releases, assign, inspect.

Publishing signs on the operator's machine: the current targets metadata is fetched,
verified against the operator's trusted root, extended with the bundle's files, signed with
the offline targets key, and uploaded together with the files. The server never sees the key.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from ..artifacts import MANIFEST_NAME, validate_bundle
from ..trust import (
    VerificationError,
    client_tls,
    load_root,
    load_signer,
    sign_targets,
    target_file,
)

__all__ = ["OperatorClient", "ServerApiError", "publish_bundle", "publish_variant"]


class ServerApiError(Exception):
    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class OperatorClient:
    def __init__(self, server_url: str, *, token: str, timeout_s: float = 60.0,
                 verify: str | Path | bool = True) -> None:
        self.base_url = server_url.rstrip("/")
        self.http = httpx.Client(timeout=timeout_s, verify=client_tls(verify),
                                 headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = self.http.request(method, f"{self.base_url}{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise ServerApiError(f"cannot reach {self.base_url}: {exc}") from exc
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ServerApiError(f"{method} {path}: HTTP {r.status_code}: {detail}",
                                 status_code=r.status_code)
        return r

    def create_enrollment_token(self, *, ttl_s: int = 3600) -> str:
        return self.request("POST", "/api/v1/enrollment-tokens", json={"ttl_s": ttl_s}).json()[
            "token"]

    def devices(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/v1/devices").json()

    def device_components(self, device_id: str) -> list[dict[str, Any]]:
        """The device's components besides its model (container apps, config files)."""
        return self.request("GET", f"/api/v1/devices/{device_id}/components").json()

    def unassign_component(self, device_id: str, component: str) -> dict[str, Any]:
        """Remove a component from a device (the device deletes it at its next check-in)."""
        return self.request("DELETE",
                            f"/api/v1/devices/{device_id}/components/{component}").json()

    def releases(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/v1/releases").json()

    def events(self, *, device_id: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if device_id:
            params["device_id"] = device_id
        return self.request("GET", "/api/v1/events", params=params).json()

    def assign(self, release_id: str, device_ids: list[str] | None = None) -> list[dict]:
        return self.request("POST", "/api/v1/assignments",
                            json={"release_id": release_id, "device_ids": device_ids}).json()

    def upload_root(self, root: bytes) -> int:
        return self.request("POST", "/api/v1/tuf/root", content=root).json()["version"]

    def upload_targets(self, targets: bytes) -> int:
        return self.request("POST", "/api/v1/tuf/targets", content=targets).json()["version"]

    def current_targets(self) -> bytes | None:
        r = self.request("GET", "/api/v1/tuf/targets-metadata")
        return None if r.status_code == 204 else r.content


def publish_bundle(
    client: OperatorClient,
    bundle_dir: Path,
    *,
    root_path: Path,
    targets_key_path: Path | list[Path],
    retries: int = 3,
    fallbacks: list[str] | None = None,
) -> dict[str, Any]:
    """Validate, sign (operator side, with every given targets key: at least the threshold)
    and upload a bundle; return the server's release. The signature covers its release terms
    (`trust._terms`): the next release counter, any hardware, and `fallbacks` (releases as
    NAME@VERSION that devices may go back to from this one; None: the previous release of
    the same model)."""
    paths = None if fallbacks is None else [_manifest_path(f) for f in fallbacks]
    return _sign_and_upload(client, "/api/v1/releases", bundle_dir, root_path=root_path,
                            targets_key_path=targets_key_path, retries=retries,
                            terms={"fallbacks": paths})


def _manifest_path(release: str) -> str:
    name, sep, version = release.partition("@")
    if not (sep and name and version) or "/" in release:
        raise ValueError(f"{release!r}: name a release as NAME@VERSION")
    return f"{name}/{version}/{MANIFEST_NAME}"


def publish_variant(
    client: OperatorClient,
    release_id: str,
    bundle_dir: Path,
    *,
    hardware: list[str],
    root_path: Path,
    targets_key_path: Path | list[Path],
    retries: int = 3,
) -> dict[str, Any]:
    """Sign and upload another build of `release_id` that devices of `hardware` install
    instead of the release's own bundle; return the release with its variants. The variant
    shares the release's signed counter and fallbacks, for `hardware` only."""
    release = client.request("GET", f"/api/v1/releases/{release_id}").json()
    return _sign_and_upload(client, f"/api/v1/releases/{release_id}/variants", bundle_dir,
                            root_path=root_path, targets_key_path=targets_key_path,
                            retries=retries, form={"hardware": list(hardware)},
                            terms={"hardware_ids": list(hardware),
                                   "same_counter_as": release["manifest_target"]})


def _sign_and_upload(client: OperatorClient, url: str, bundle_dir: Path, *, root_path: Path,
                     targets_key_path: Path | list[Path], retries: int,
                     form: dict[str, Any] | None = None,
                     terms: dict[str, Any] | None = None) -> dict[str, Any]:
    bundle_dir = Path(bundle_dir)
    manifest = validate_bundle(bundle_dir)
    root = load_root(root_path)
    paths = targets_key_path if isinstance(targets_key_path, list) else [targets_key_path]
    signer = [load_signer(p) for p in paths]
    prefix = f"{manifest.name}/{manifest.version}/"
    base = (terms or {}).get("same_counter_as")
    if base is not None and not base.startswith(f"{manifest.name}/"):
        # The server named the release; sign its counter only for the same model.
        raise VerificationError(f"the server says the release is {base}, which is not a "
                                f"release of {manifest.name}: refusing to sign")
    rels = [MANIFEST_NAME, *manifest.files]
    add = {prefix + rel: target_file(prefix + rel, bundle_dir / rel) for rel in rels}
    for attempt in range(retries):
        signed = sign_targets(root=root, signer=signer, current=client.current_targets(),
                              add=add, **{k: v for k, v in (terms or {}).items()
                                          if v is not None})
        with ExitStack() as stack:
            files = [("files", (prefix + rel, stack.enter_context(open(bundle_dir / rel, "rb")),
                                "application/octet-stream")) for rel in rels]
            try:
                return client.request(
                    "POST", url, data=form,
                    files=[("targets", ("targets.json", signed, "application/json")), *files],
                ).json()
            except ServerApiError as exc:
                # Someone else published between our read and our upload: re-sign on top.
                if "does not follow the current version" not in str(exc) or attempt == retries - 1:
                    raise
        time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")
