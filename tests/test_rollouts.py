"""Staged rollouts end to end: a real server deciding by itself, real agent daemons."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from edgewise.agent import agent_status
from edgewise.sim import AgentProcess

pytestmark = pytest.mark.slow


def device_id(state: Path) -> str:
    return json.loads((state / "identity.json").read_text())["device_id"]


def wait_for(predicate: Callable[[], object], what: str, timeout_s: float = 120) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def fleet(live_server, enroll_agent, tmp_path: Path):
    """Four enrolled devices running v1 as agent daemons, in a static group."""
    states = [enroll_agent(f"d{i}", tags=["site=lab"]) for i in range(4)]
    procs = [AgentProcess(state_dir=s, poll_interval_s=0.5, log_path=tmp_path / f"{s.name}.log")
             .start() for s in states]
    v1 = None
    try:
        from tests.conftest import make_tiny_bundle

        v1 = live_server.publish(make_tiny_bundle(tmp_path / "v1"))
        with live_server.client() as c:
            wait_for(lambda: all(d["release_id"] == v1["id"] for d in c.devices()), "v1")
            c.request("POST", "/api/v1/groups", json={"name": "lab", "kind": "dynamic",
                                                      "selector": ["site=lab"]})
        yield states, v1
    finally:
        for p in procs:
            p.stop()


def test_good_release_rolls_out_stage_by_stage(live_server, fleet, tmp_path: Path) -> None:
    from tests.conftest import make_tiny_bundle

    states, v1 = fleet
    v2 = live_server.publish(make_tiny_bundle(tmp_path / "v2", version="2.0.0", seed=1),
                             assign=False)
    with live_server.client() as c:
        rollout = c.request("POST", "/api/v1/rollouts", json={
            "release_id": v2["id"], "group": "lab",
            "stages": "canary:1,field-test:50%,broad:100%"}).json()
        final = wait_for(lambda: (r := c.request("GET", f"/api/v1/rollouts/{rollout['id']}")
                                  .json())["status"] == "completed" and r, "completion")
        assert final["progress"]["committed"] == 4
        # Every device reported what it downloaded: tiny files (no deltas) sent in full, the
        # unchanged model card copied from the installed release instead.
        transfer = final["transfer"]
        assert 0 < transfer["bytes_sent"] < transfer["bytes_full"]
        assert transfer["delta_files"] == 0 and transfer["reused_files"] == 4
        assert all(d["release_id"] == v2["id"] for d in c.devices())
        kinds = [e["kind"] for e in c.events(limit=1000) if e.get("rollout_id") == rollout["id"]
                 and e["kind"].startswith("rollout-")]
        assert kinds == ["rollout-created", "rollout-stage-advanced", "rollout-stage-advanced",
                         "rollout-completed"]


def test_bad_release_stops_at_the_canary_and_rolls_back(live_server, fleet,
                                                        tmp_path: Path) -> None:
    from tests.conftest import make_tiny_bundle

    states, v1 = fleet
    bad = live_server.publish(make_tiny_bundle(tmp_path / "bad", version="2.0.0", broken=True),
                              assign=False)
    with live_server.client() as c:
        rollout = c.request("POST", "/api/v1/rollouts", json={
            "release_id": bad["id"], "group": "lab",
            "stages": "canary:1,field-test:50%,broad:100%"}).json()
        final = wait_for(lambda: (r := c.request("GET", f"/api/v1/rollouts/{rollout['id']}")
                                  .json())["status"] == "aborted" and r, "abort")
        assert final["stage"] == "canary" and final["progress"]["assigned"] == 1
        assert "failed" in final["reason"]
        devices = c.devices()
        # Only the canary ever saw the bad release; everyone runs v1, assigned v1 again.
        assert sum(1 for d in devices if d["state"] == "rolled-back") == 1
        assert all(d["release_id"] == v1["id"] for d in devices)
        assert all(d["assigned_release_id"] == v1["id"] for d in devices)
        # Nothing more happens: the ring is closed.
        time.sleep(2)
        assert c.request("GET", f"/api/v1/rollouts/{rollout['id']}").json()["progress"][
            "assigned"] == 1


def test_operator_pause_resume_and_fleet_rollback(live_server, fleet, tmp_path: Path) -> None:
    from tests.conftest import make_tiny_bundle

    states, v1 = fleet
    v2 = live_server.publish(make_tiny_bundle(tmp_path / "v2", version="2.0.0"), assign=False)
    with live_server.client() as c:
        rollout = c.request("POST", "/api/v1/rollouts", json={
            "release_id": v2["id"], "group": "lab", "stages": "canary:1,broad:100%",
            "min_soak_s": 3600}).json()  # the canary soaks for an hour: we act meanwhile
        rid = rollout["id"]
        wait_for(lambda: c.request("GET", f"/api/v1/rollouts/{rid}").json()["progress"][
            "committed"] == 1, "canary commit")
        assert c.request("POST", f"/api/v1/rollouts/{rid}/pause").json()["status"] == "paused"
        assert c.request("POST", f"/api/v1/rollouts/{rid}/resume").json()["status"] == "active"
        assert c.request("POST", f"/api/v1/rollouts/{rid}/rollback").json()["status"] == \
            "rolled-back"
        # The canary goes back to v1 by a new assignment of the old release.
        wait_for(lambda: all(d["release_id"] == v1["id"] for d in c.devices()), "fleet rollback")


def test_window_defers_installation_until_it_opens(live_server, enroll_agent,
                                                  tmp_path: Path) -> None:
    from tests.conftest import make_tiny_bundle

    state = enroll_agent("win", timezone="Asia/Tokyo")
    now_tokyo = datetime.now(UTC) + timedelta(hours=9)
    closed = {"days": "daily", "start": f"{(now_tokyo.hour + 3) % 24:02d}:00",
              "duration_min": 60, "max_defer_s": 7200}
    with live_server.client() as c:
        c.request("PATCH", f"/api/v1/devices/{device_id(state)}", json={"window": closed})
    proc = AgentProcess(state_dir=state, poll_interval_s=0.5, api_port=_free_port(),
                        log_path=tmp_path / "win.log").start()
    try:
        live_server.publish(make_tiny_bundle(tmp_path / "v1"))
        status = wait_for(lambda: (s := agent_status(state))["state"] == "awaiting-window" and s,
                          "awaiting-window")
        assert status["release"] is None  # downloaded and verified, but not installed
        with live_server.client() as c:  # the server sees the waiting device too
            wait_for(lambda: next(d for d in c.devices() if d["id"] == device_id(state))[
                "state"] == "awaiting-window", "server sees awaiting-window")
        upcoming = status["upcoming"]
        assert upcoming["release"] == "tiny@1.0.0" and upcoming["timezone"] == "Asia/Tokyo"
        assert upcoming["may_defer_until"] is not None
        # The local API tells the device's users the same.
        api = f"http://127.0.0.1:{proc.api_port}"
        assert wait_for(lambda: _get(f"{api}/status"), "local API")["upcoming"]["release"] == \
            "tiny@1.0.0"
        # Open the window now: the agent installs by itself.
        with live_server.client() as c:
            c.request("PATCH", f"/api/v1/devices/{device_id(state)}",
                      json={"window": {"days": "daily", "start": "00:00",
                                       "duration_min": 1440}})
        wait_for(lambda: agent_status(state)["state"] == "committed", "install in window")
    finally:
        proc.stop()


def test_user_can_defer_within_policy_and_give_feedback(live_server, enroll_agent,
                                                       tmp_path: Path) -> None:
    from edgewise.agent import AgentConfigError, StateDir, defer_update, submit_feedback
    from tests.conftest import make_tiny_bundle

    state = enroll_agent("user")
    with live_server.client() as c:
        c.request("PATCH", f"/api/v1/devices/{device_id(state)}", json={"window": {
            "days": "daily", "start": "00:00", "duration_min": 1440, "max_defer_s": 600}})
    live_server.publish(make_tiny_bundle(tmp_path / "v1"))
    proc = AgentProcess(state_dir=state, poll_interval_s=0.5, log_path=tmp_path / "u.log")
    # Stage the update without installing: a deferral needs a pending update.
    with pytest.raises(AgentConfigError, match="no update is pending"):
        defer_update(StateDir(state), seconds=60)
    proc.start()
    try:
        wait_for(lambda: agent_status(state)["state"] == "committed", "install")
        with pytest.raises(AgentConfigError, match="no update is pending"):
            defer_update(StateDir(state), seconds=60)
        submit_feedback(StateDir(state), rating=2, comment="misses boots",
                        predicted="one", correct="two")
        with live_server.client() as c:
            release_id = c.releases()[0]["id"]
            summary = wait_for(lambda: (f := c.request(
                "GET", f"/api/v1/releases/{release_id}/feedback").json())["count"] and f,
                "feedback delivered")
        assert summary["mean_rating"] == 2 and summary["confusions"] == {"one -> two": 1}
        assert not list((state / "feedback").glob("*.json"))
    finally:
        proc.stop()


def _free_port() -> int:
    from edgewise.sim import free_port

    return free_port()


def _get(url: str):
    try:
        return httpx.get(url, timeout=2).json()
    except httpx.HTTPError:
        return None
