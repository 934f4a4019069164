"""Input drift: the agent reports its detector's aggregates (never an image or a single score),
the server pools them per release, and a rollout gate pauses when the field's inputs look
unlike the training data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgewise.agent import DriftLog, StateDir
from edgewise.agent._client import ServerClient
from edgewise.agent._errors import AgentTransportError
from edgewise.artifacts import DetectorSpec
from tests.test_e2e_update import run_once

pytestmark = pytest.mark.slow

SPEC = DetectorSpec(model="detector.onnx", method="reconstruction", threshold=1.0,
                    target_fpr=0.05, histogram_edges=(0.5, 1.0, 2.0))


def _record(state: Path, release: str, scores: list[float]) -> None:
    log = DriftLog(state)
    for score in scores:
        log.record(score, SPEC, release)


def _device_client(state: Path, live_server) -> ServerClient:  # signing with the device's key
    paths = StateDir(state)
    identity = paths.load_identity()
    return ServerClient(identity.server_url, device_id=identity.device_id,
                        key=paths.device_key(), verify=str(live_server.ca))


def test_drift_aggregates_reach_the_server_once(live_server, enroll_agent, tiny_bundle,
                                                tmp_path: Path) -> None:
    state = enroll_agent("d1")
    release = live_server.publish(tiny_bundle("1.0.0"))
    assert run_once(state, tmp_path) == 0
    _record(state, "tiny@1.0.0", [0.1] * 18 + [1.5] * 8 + [3.0] * 4)
    assert run_once(state, tmp_path) == 0
    with live_server.client() as c:
        drift = c.request("GET", f"/api/v1/releases/{release['id']}/drift").json()
    assert (drift["devices"], drift["inputs"], drift["anomalous"]) == (1, 30, 12)
    assert drift["share_anomalous"] == 0.4 and drift["expected_share"] == 0.05
    assert drift["histogram"] == [18, 0, 8, 4] and drift["histogram_edges"] == [0.5, 1.0, 2.0]
    sent = json.loads((state / "drift-sent.json").read_text())

    assert run_once(state, tmp_path) == 0  # nothing new: not sent again
    assert json.loads((state / "drift-sent.json").read_text()) == sent

    # A device reports only for the release it runs, with consistent figures.
    client = _device_client(state, live_server)
    try:
        with pytest.raises(AgentTransportError, match="HTTP 422"):
            client.drift({"release_id": "rel-other", "inputs": 1, "anomalous": 0})
        with pytest.raises(AgentTransportError, match="HTTP 422"):
            client.drift({"release_id": release["id"], "inputs": 1, "anomalous": 2})
        with pytest.raises(AgentTransportError, match="HTTP 422"):
            client.drift({"release_id": release["id"], "inputs": 3, "anomalous": 1,
                          "histogram_edges": [1.0], "histogram": [1, 1, 1]})
    finally:
        client.close()


def test_rollout_pauses_when_the_field_drifts(live_server, enroll_agent, tiny_bundle,
                                              tmp_path: Path) -> None:
    state = enroll_agent("d2", tags=["field"])
    live_server.publish(tiny_bundle("1.0.0"))
    assert run_once(state, tmp_path) == 0
    v2 = live_server.publish(tiny_bundle("2.0.0"), assign=False)
    with live_server.client() as c:
        c.request("POST", "/api/v1/groups", json={"name": "field", "kind": "dynamic",
                                                  "selector": ["field"]})
        rollout = c.request("POST", "/api/v1/rollouts", json={
            "release_id": v2["id"], "group": "field", "stages": "canary:1,broad:100%",
            "min_soak_s": 600, "gates": {"max_anomalous_share": 0.2, "min_drift_inputs": 20,
                                         "max_latency_ratio": None, "max_memory_ratio": None}
        }).json()
    deadline = time.monotonic() + 60
    while json.loads((state / "state.json").read_text()).get("installed", {}) \
            .get("version") != "2.0.0" and time.monotonic() < deadline:
        assert run_once(state, tmp_path) == 0
        time.sleep(0.3)
    _record(state, "tiny@2.0.0", [0.1] * 20 + [1.5] * 10)  # a third of the inputs: drift
    assert run_once(state, tmp_path) == 0
    with live_server.client() as c:
        for _ in range(100):
            status = c.request("GET", f"/api/v1/rollouts/{rollout['id']}").json()
            if status["status"] != "active":
                break
            time.sleep(0.2)
    assert status["status"] == "paused", status
    assert "drift" in status["reason"] and "33.3% of 30 inputs" in status["reason"]


def test_only_aggregates_leave_the_device(tmp_path: Path) -> None:
    """What the agent sends is exactly the aggregate fields: counts, the histogram over the
    bundle's fixed bins, per-hour shares; no image, no single score, no finer timestamp."""
    from edgewise.agent._anomaly import flush_drift
    from edgewise.agent._store import ReleaseRef

    class Capture:
        def __init__(self) -> None:
            self.sent: list[dict] = []

        def drift(self, body: dict) -> None:
            self.sent.append(json.loads(json.dumps(body)))

    scores = [0.123456, 0.7, 1.5, 2.5, 0.2]
    _record(tmp_path, "tiny@1.0.0", scores)
    installed = ReleaseRef(release_id="rel-1", name="tiny", version="1.0.0",
                           manifest_target="tiny/1.0.0/edgewise.json")
    client = Capture()
    assert flush_drift(tmp_path, client, installed, min_interval_s=0, now=1000.0)
    (body,) = client.sent
    assert set(body) == {"release_id", "inputs", "anomalous", "expected_share",
                         "histogram_edges", "histogram", "per_hour"}
    assert (body["inputs"], body["anomalous"], body["histogram"]) == (5, 2, [2, 1, 1, 1])
    assert all(len(hour) == len("2026-01-01T00:00Z") and hour.endswith(":00Z")
               for hour in body["per_hour"])
    text = json.dumps(body)
    assert "0.123456" not in text and "1.5," not in text  # no individual score
    # Unchanged aggregates are not sent again; new ones wait for the interval.
    assert not flush_drift(tmp_path, client, installed, min_interval_s=0, now=1001.0)
    _record(tmp_path, "tiny@1.0.0", [0.1])
    assert not flush_drift(tmp_path, client, installed, min_interval_s=300, now=1100.0)
    assert flush_drift(tmp_path, client, installed, min_interval_s=300, now=1400.0)
    assert client.sent[-1]["inputs"] == 6
    # Aggregates of another release (before an update) are not reported for this one.
    other = ReleaseRef(release_id="rel-2", name="tiny", version="2.0.0",
                       manifest_target="tiny/2.0.0/edgewise.json")
    assert not flush_drift(tmp_path, client, other, min_interval_s=0, now=5000.0)
