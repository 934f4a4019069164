"""Per-hardware release variants and group device profiles: devices of the variant's hardware
install its build (verified through TUF like any release), everyone else the release's own;
a variant that is not the same model is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgewise.agent import agent_status, enroll
from edgewise.server.client import ServerApiError, publish_variant
from edgewise.trust import VerificationError
from tests.conftest import make_tiny_bundle
from tests.test_e2e_update import run_once, server_device

pytestmark = pytest.mark.slow


def _enroll(live_server, tmp_path: Path, name: str, hardware: str) -> Path:
    with live_server.client() as c:
        token = c.create_enrollment_token()
    state = tmp_path / f"agent-{name}"
    enroll(state, server_url=live_server.url, token=token, root_path=live_server.keys.root_json,
           name=name, hardware=hardware, ca_path=live_server.ca)
    return state


def test_devices_install_the_build_for_their_hardware(live_server, tmp_path: Path) -> None:
    small = _enroll(live_server, tmp_path, "small", "cortex-a53")
    big = _enroll(live_server, tmp_path, "big", "x86-avx512")
    release = live_server.publish(make_tiny_bundle(tmp_path / "v1", version="1.0.0"),
                                  assign=False)
    keys = live_server.keys
    with live_server.client() as c:
        out = publish_variant(c, release["id"], make_tiny_bundle(
            tmp_path / "v1-int8", version="1.0.0+int8", seed=3), hardware=["cortex-a53"],
            root_path=keys.root_json, targets_key_path=keys.targets_key)
        assert [(v["hardware"], v["version"]) for v in out["variants"]] == [
            ("cortex-a53", "1.0.0+int8")]
        c.assign(release["id"])

    for state in (small, big):
        assert run_once(state, tmp_path) == 0
    assert agent_status(small)["release"] == "tiny@1.0.0+int8"
    assert agent_status(small)["state"] == "committed"
    assert agent_status(big)["release"] == "tiny@1.0.0"
    # Both run the same release as far as the server (rollouts, reports) is concerned.
    for state in (small, big):
        device = server_device(live_server, state)
        assert device["release_id"] == release["id"] and device["state"] == "committed"
    with live_server.client() as c:
        kinds = [e["kind"] for e in c.events()]
    assert "variant-published" in kinds


def test_bad_variants_are_refused_and_change_nothing(live_server, tmp_path: Path) -> None:
    release = live_server.publish(make_tiny_bundle(tmp_path / "v1"), assign=False)
    keys = live_server.keys
    kw = {"root_path": keys.root_json, "targets_key_path": keys.targets_key}
    with live_server.client() as c:
        # Refused by the publisher (the server names a release of another model), and by the
        # server if signed anyway.
        with pytest.raises((ServerApiError, VerificationError),
                           match="model name 'tiny'|not a release of other"):
            publish_variant(c, release["id"], make_tiny_bundle(
                tmp_path / "other", name="other", version="1.0.0+x"), hardware=["a"], **kw)
        with pytest.raises(ServerApiError, match="HTTP 404"):
            publish_variant(c, "rel-nope", make_tiny_bundle(tmp_path / "v2", version="1.0.1"),
                            hardware=["a"], **kw)
        with pytest.raises((ServerApiError, VerificationError), match="at least one hardware"):
            publish_variant(c, release["id"], make_tiny_bundle(
                tmp_path / "v3", version="1.0.0+y"), hardware=[" "], **kw)
        publish_variant(c, release["id"], make_tiny_bundle(tmp_path / "ok", version="1.0.0+z"),
                        hardware=["a"], **kw)
        with pytest.raises(ServerApiError, match="already has a variant for a"):
            publish_variant(c, release["id"], make_tiny_bundle(
                tmp_path / "dup", version="1.0.0+w"), hardware=["a"], **kw)
        got = c.request("GET", f"/api/v1/releases/{release['id']}").json()
        assert [v["version"] for v in got["variants"]] == ["1.0.0+z"]


def test_group_profile_round_trip_and_roles(live_server, tmp_path: Path) -> None:
    with live_server.client() as c:
        c.request("POST", "/api/v1/groups", json={"name": "field", "kind": "dynamic",
                                                  "selector": ["field"]})
        with pytest.raises(ServerApiError, match="HTTP 404"):
            c.request("GET", "/api/v1/groups/field/profile")
        c.request("PUT", "/api/v1/groups/field/profile", json={
            "max_ram_mb": 64, "max_latency_ms": 20, "min_accuracy": 0.85,
            "hardware": ["cortex-a53", "cortex-a53", " "]})
        got = c.request("GET", "/api/v1/groups/field/profile").json()
        assert got["group"] == "field" and got["hardware"] == ["cortex-a53"]
        assert (got["max_ram_mb"], got["min_accuracy"], got["latency_stat"]) == (64, 0.85, "p95")
        with pytest.raises(ServerApiError, match="HTTP 422"):
            c.request("PUT", "/api/v1/groups/field/profile", json={"min_accuracy": 85})
        with pytest.raises(ServerApiError, match="HTTP 404"):
            c.request("PUT", "/api/v1/groups/nope/profile", json={"max_ram_mb": 1})
        viewer = c.request("POST", "/api/v1/tokens", json={"name": "v", "role": "viewer"}).json()
    from edgewise.server.client import OperatorClient

    with OperatorClient(live_server.url, token=viewer["token"], verify=str(live_server.ca)) as v:
        assert v.request("GET", "/api/v1/groups/field/profile").json()["max_ram_mb"] == 64
        with pytest.raises(ServerApiError, match="HTTP 403"):
            v.request("PUT", "/api/v1/groups/field/profile", json={"max_ram_mb": 1})
