"""End to end: a real uvicorn server, real agent processes, real TUF metadata on loopback."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import pytest

from edgewise.agent import agent_status
from edgewise.sim import AgentProcess


def run_once(state: Path, tmp_path: Path, fault: str | None = None) -> int:
    proc = AgentProcess(state_dir=state, once=True, fault=fault,
                        log_path=tmp_path / f"{state.name}.log").start()
    return proc.wait(timeout_s=120)


def server_device(live_server, state: Path) -> dict:
    device_id = json.loads((state / "identity.json").read_text())["device_id"]
    with live_server.client() as c:
        return next(d for d in c.devices() if d["id"] == device_id)


def test_happy_path_then_failed_model_rolls_back(live_server, enroll_agent, tiny_bundle,
                                                 tmp_path: Path) -> None:
    state = enroll_agent("a1")
    v1 = live_server.publish(tiny_bundle("1.0.0"))
    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert status["state"] == "committed" and status["release"] == "tiny@1.0.0"
    first_slot = status["active_slot"]
    device = server_device(live_server, state)
    assert device["state"] == "committed" and device["release_id"] == v1["id"]

    v2 = live_server.publish(tiny_bundle("2.0.0", broken=True))
    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert status["state"] == "rolled-back"
    assert status["release"] == "tiny@1.0.0" and status["active_slot"] == first_slot
    assert "health check failed" in status["last_error"]
    device = server_device(live_server, state)
    assert device["state"] == "rolled-back" and device["release_id"] == v1["id"]

    # Every transition reached the server's event log, in order.
    with live_server.client() as c:
        kinds = [(e["kind"], e["state"]) for e in c.events(device_id=device["id"])
                 if e["release_id"] == v2["id"] and e["state"]]
    assert kinds == [
        ("update-available", "downloading"), ("downloaded", "verifying"),
        ("verified", "installing"), ("installed", "activating"),
        ("activated", "health-checking"), ("unhealthy", "rolling-back"),
        ("rolled-back", "rolled-back"),
    ]
    # The rejected release is not retried.
    assert run_once(state, tmp_path) == 0
    assert agent_status(state)["state"] == "rolled-back"


def test_tampered_artifact_is_refused(live_server, enroll_agent, tiny_bundle,
                                      tmp_path: Path) -> None:
    state = enroll_agent("a2")
    live_server.publish(tiny_bundle("1.0.0"))
    assert run_once(state, tmp_path) == 0
    assert agent_status(state)["release"] == "tiny@1.0.0"

    from tests.conftest import make_tiny_bundle

    # A new model (an unchanged file would be copied from the installed release instead).
    bundle = make_tiny_bundle(tmp_path / "v1.1", version="1.1.0", seed=5)
    live_server.publish(bundle)
    # An attacker with the server's disk swaps the model bytes in the object store.
    from edgewise.artifacts import file_sha256

    sha, _ = file_sha256(bundle / "model.onnx")
    obj = live_server.data_dir / "tuf" / "objects" / sha
    obj.write_bytes(obj.read_bytes()[:-8] + b"\x00" * 8)

    assert run_once(state, tmp_path) == 0
    status = agent_status(state)
    assert status["state"] == "failed"
    assert status["release"] == "tiny@1.0.0"
    assert "verification failed" in status["last_error"] or "hash" in status["last_error"]
    device = server_device(live_server, state)
    assert device["state"] == "failed"


def test_server_refuses_targets_not_signed_by_the_operator(live_server, tiny_bundle,
                                                           tmp_path: Path) -> None:
    from edgewise.server.client import ServerApiError, publish_bundle
    from edgewise.trust import init_keys

    other = init_keys(tmp_path / "attacker-keys")
    # The operator's own tooling refuses a key that is not in its root...
    with live_server.client() as c, pytest.raises(Exception, match="not a targets key"):
        publish_bundle(c, tiny_bundle("6.6.6"), root_path=live_server.keys.root_json,
                       targets_key_path=other.targets_key)
    # ...and the server refuses targets signed by anyone else, whatever root they claim.
    with live_server.client() as c, \
            pytest.raises(ServerApiError, match="not signed by the targets key"):
        publish_bundle(c, tiny_bundle("6.6.7"), root_path=other.root_json,
                       targets_key_path=other.targets_key)
    with live_server.client() as c:
        assert c.releases() == []


class ReportsSeen(httpx.BaseTransport):
    """The agent's network, recording each report request; `old_server` answers a list of
    reports as a server from before batches does (422)."""

    def __init__(self, ca: Path, *, old_server: bool = False) -> None:
        self.inner = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(ca)))
        self.old_server = old_server
        self.posts: list[object] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/api/v1/device/reports":
            body = json.loads(request.read())
            self.posts.append(body)
            if self.old_server and isinstance(body, list):
                return httpx.Response(422, json={"detail": "Input should be a valid dictionary"})
        return self.inner.handle_request(request)


@pytest.mark.parametrize("old_server", [False, True], ids=["batches", "server-before-batches"])
def test_an_update_of_quick_steps_reports_them_together(live_server, enroll_agent, tiny_bundle,
                                                        old_server: bool) -> None:
    from edgewise.agent import Agent, AgentConfig

    state = enroll_agent("quick")
    live_server.publish(tiny_bundle("1.0.0"))
    seen = ReportsSeen(live_server.ca, old_server=old_server)
    agent = Agent(AgentConfig(state_dir=state, transport=seen))
    assert agent.run_cycle().value == "committed"
    steps = ["downloading", "verifying", "installing", "activating", "health-checking",
             "committed"]
    if old_server:  # the batch refused once, then one report per request
        assert seen.posts[0]["state"] == "downloading"
        assert [len(p) for p in seen.posts[1:2]] == [5]
        assert [p["state"] for p in seen.posts[2:]] == steps[1:]
    else:  # the first step at once (the server sees the update start), the rest together
        assert seen.posts[0]["state"] == "downloading"
        assert [p["state"] for p in seen.posts[1]] == steps[1:] and len(seen.posts) == 2
    assert not agent.record.outbox
    device = server_device(live_server, state)
    assert device["state"] == "committed"
    with live_server.client() as c:
        assert [e["state"] for e in c.events(device_id=device["id"])
                if e["state"]][-6:] == steps
    agent.close()
