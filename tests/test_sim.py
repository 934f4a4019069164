"""The fleet simulator's pieces: scenario schema, network transport, verdicts, and the
power-cut table on in-process agents (the real Agent, abandoned mid-state and rebooted)."""

from __future__ import annotations

import json
import random
import secrets
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from edgewise.agent import Agent, AgentConfig, State, StateDir, health_check
from edgewise.sim import DeviceLink, LinkStats, PowerCut, SimTransport, load_scenario
from edgewise.sim._faults import PowerCutPlan, power_cut_hook
from edgewise.sim._report import classify_failure, evaluate
from edgewise.sim._scenario import Expectations, NetworkProfile, Scenario

SCENARIOS = sorted((Path(__file__).parent.parent / "scenarios").glob("*.yaml"))


# ---- scenario files -------------------------------------------------------------------------

@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_shipped_scenarios_load(path: Path) -> None:
    sc = load_scenario(path)
    assert sc.devices >= 1 and sc.expect.max_bricked == 0


def test_scenario_rejects_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndevices: 3\nfaults: {power_cuts: {count: 1}}\n")  # typo'd key
    with pytest.raises(ValidationError):
        load_scenario(bad)
    with pytest.raises(ValidationError):
        Scenario(name="x", devices=0)
    with pytest.raises(ValidationError):
        Scenario(name="x", devices=2, baseline={"version": "1"}, candidate={"version": "1"})


def test_scenario_components_name_what_the_rollout_moves() -> None:
    site = {"name": "site", "kind": "config", "baseline": {"version": "1.0.0"},
            "candidate": {"version": "2.0.0"}}
    sc = Scenario(name="x", devices=2, components=[site], rollout={"component": "site"})
    assert sc.rollout.component == "site" and sc.components[0].candidate.version == "2.0.0"
    for components, rollout, message in [
        ([site], {"component": "other"}, "'other' is not one of components"),
        ([{**site, "candidate": None}], {"component": "site"}, "needs a candidate"),
        ([site, site], {}, "must be unique"),
        ([{**site, "name": "model"}], {}, "must be unique and not 'model'"),
        ([{**site, "kind": "app"}], {}, "Input should be 'config'"),
    ]:
        with pytest.raises(ValidationError, match=message):
            Scenario(name="x", devices=2, components=components, rollout=rollout)


# ---- the network seam -----------------------------------------------------------------------

def _inner(body: bytes = b"0123456789" * 10) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(200, content=body))


def test_transport_corrupts_then_truncates_target_downloads_only() -> None:
    stats = LinkStats()
    link = DeviceLink(profile=NetworkProfile(name="lan"), rng=random.Random(0),
                      damage_left=1, damage_mode="corrupt", armed=True)
    client = httpx.Client(transport=SimTransport(_inner(), link, stats))
    clean = b"0123456789" * 10
    assert client.get("http://s/tuf/metadata/timestamp.json").content == clean
    damaged = client.get("http://s/tuf/targets/m/abc.model.onnx").content
    assert len(damaged) == len(clean) and damaged != clean
    assert client.get("http://s/tuf/targets/m/abc.model.onnx").content == clean  # once only
    link.damage_left, link.damage_mode = 1, "truncate"
    assert client.get("http://s/tuf/targets/x").content == clean[:50]
    assert stats.damaged == 2 and stats.requests == 4 and stats.bytes_down == 350


def test_transport_drops_requests_while_offline_or_lossy() -> None:
    stats = LinkStats()
    offline = DeviceLink(profile=NetworkProfile(name="sat", disconnect_every_s=10,
                                                disconnect_for_s=10), rng=random.Random(0),
                         armed=True)
    with pytest.raises(httpx.ConnectError):
        httpx.Client(transport=SimTransport(_inner(), offline, stats)).get("http://s/x")
    lossy = DeviceLink(profile=NetworkProfile(name="lossy", loss=0.5), rng=random.Random(1),
                      armed=True)
    client = httpx.Client(transport=SimTransport(_inner(), lossy, stats))
    outcomes = []
    for _ in range(200):
        try:
            client.get("http://s/x")
            outcomes.append(True)
        except httpx.ConnectError:
            outcomes.append(False)
    assert 60 < outcomes.count(False) < 140
    assert stats.dropped == 1 + outcomes.count(False)


# ---- verdicts -------------------------------------------------------------------------------

def _summary(**over) -> dict:
    base = {"timed_out": False, "rollout": {"status": "completed", "stage": "broad"},
            "on_candidate_fraction": 1.0, "bricked": 0, "lost_records": 0, "wall_s": 10.0,
            "invariants": [{"name": "working-model", "ok": True, "count": 0}],
            "agent_crashes": 0}
    return {**base, **over}


def test_expectations_pass_and_fail() -> None:
    expect = Expectations(rollout="completed", final_stage="broad", min_on_candidate=0.9)
    assert all(r["ok"] for r in evaluate(_summary(), expect))
    rows = evaluate(_summary(rollout={"status": "aborted", "stage": "canary"},
                             on_candidate_fraction=0.0, bricked=1), expect)
    failed = {r["name"] for r in rows if not r["ok"]}
    assert failed == {"rollout status", "final stage", "on candidate >=", "bricked <="}
    rows = evaluate(_summary(invariants=[{"name": "nothing-lost", "ok": False, "count": 2}]),
                    Expectations())
    assert [r["name"] for r in rows if not r["ok"]] == ["invariant nothing-lost"]


@pytest.mark.parametrize(("event", "message", "cause"), [
    ("resumed", "resumed after interruption in installing", "power-cut"),
    ("error", "[Errno 28] No space left on device (simulated)", "disk-full"),
    ("unhealthy", "health check failed: p95 latency 9 ms > limit 5 ms", "health-check"),
    ("error", "Downloaded 10 bytes exceeding the maximum allowed length of 5", "corrupt-download"),
    ("error", "GET /api/v1/device/assignment: simulated network outage", "network"),
    ("error", "site@2.0.0 is invalid: its check 'sh -c ! grep -q ^invalid mode.txt' exited 1",
     "invalid-config"),
])
def test_failure_causes(event: str, message: str, cause: str) -> None:
    assert classify_failure(event, message) == cause


# ---- power cut in every state, on in-process agents ------------------------------------------

GOOD, BROKEN = "good", "broken"
IN_FLIGHT = ["downloading", "verifying", "installing", "activating", "health-checking"]
# (candidate, state to cut power in, when, expected final state, expected release)
CUT_CASES = [
    (kind, state, when, final, release)
    for kind, states, final, release in [
        (GOOD, ["committed", *IN_FLIGHT], "committed", "2.0.0"),
        (BROKEN, [*IN_FLIGHT, "rolling-back"], "rolled-back", "1.0.0"),
    ]
    for state in states
    for when in ("before", "after")
]


@pytest.fixture(scope="module")
def sim_server(tmp_path_factory):
    from edgewise.server.client import OperatorClient, publish_bundle
    from edgewise.sim import ServerProcess
    from edgewise.sim._bundles import synthetic_bundle
    from edgewise.trust import init_keys

    tmp = tmp_path_factory.mktemp("simsrv")
    keys = init_keys(tmp / "keys")
    token = secrets.token_urlsafe(24)
    proc = ServerProcess(data_dir=tmp / "server", root_path=keys.root_json,
                         online_key_path=keys.online_key, admin_token=token,
                         log_path=tmp / "server.log").start()
    try:
        ids = {}
        with OperatorClient(proc.url, token=token) as client:
            for key, version, broken in (("v1", "1.0.0", False), (GOOD, "2.0.0", False),
                                         (BROKEN, "3.0.0", True)):
                bundle = synthetic_bundle(tmp / key, name="m", version=version, broken=broken)
                ids[key] = publish_bundle(client, bundle, root_path=keys.root_json,
                                          targets_key_path=keys.targets_key)["id"]
        yield proc, token, keys, ids, tmp
    finally:
        proc.stop()


def _enrolled(sim_server, name: str) -> Path:
    from edgewise.agent import enroll
    from edgewise.server.client import OperatorClient

    proc, token, keys, _ids, tmp = sim_server
    with OperatorClient(proc.url, token=token) as client:
        enrollment = client.create_enrollment_token()
    state = tmp / name
    enroll(state, server_url=proc.url, token=enrollment, root_path=keys.root_json, name=name,
           hardware="sim", insecure_dev=True)
    return state


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "state", "when", "final", "release"), CUT_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CUT_CASES])
def test_power_cut_in_every_state_in_process(sim_server, kind: str, state: str, when: str,
                                             final: str, release: str) -> None:
    from edgewise.server.client import OperatorClient

    proc, token, _keys, ids, _tmp = sim_server
    device = _enrolled(sim_server, f"cut-{kind}-{state}-{when}")
    device_id = json.loads((device / "identity.json").read_text())["device_id"]
    with OperatorClient(proc.url, token=token) as client:
        client.assign(ids["v1"], [device_id])
        assert Agent(AgentConfig(state_dir=device)).run_cycle() is State.COMMITTED
        client.assign(ids[kind], [device_id])

    plan = PowerCutPlan(State(state), when)
    doomed = Agent(AgentConfig(state_dir=device, fault_hook=power_cut_hook(lambda: plan)))
    with pytest.raises(PowerCut):
        doomed.run_cycle()
    assert plan.fired
    saved = StateDir(device).load_record().state.value
    if state == "committed":  # cut while checking: the update had not started
        assert saved == "committed"
    elif when == "before":
        assert saved == state
    _assert_working_model(device, broken_may_be_live=kind == BROKEN)

    # Boot: a fresh Agent on the same state directory resumes and finishes.
    agent = Agent(AgentConfig(state_dir=device))
    assert agent.run_cycle().value == final
    rec = agent.record
    assert rec.installed.version == release and not rec.outbox
    _assert_working_model(device, expect=release)
    if state != "committed" and (when == "before" or saved == state):
        assert "resumed" in [h["event"] for h in rec.history]
    with OperatorClient(proc.url, token=token) as client:
        server = client.request("GET", f"/api/v1/devices/{device_id}").json()
    assert server["state"] == final
    assert server["release_id"] == (ids[kind] if final == "committed" else ids["v1"])


def _assert_working_model(device: Path, *, expect: str | None = None,
                          broken_may_be_live: bool = False) -> None:
    slots = device / "slots"
    active = (slots / "active").read_text().strip()
    meta = json.loads((slots / active / "slot.json").read_text())
    if expect is not None:
        assert meta["version"] == expect
    if not (broken_may_be_live and meta["version"] == "3.0.0"):
        report = health_check(slots / active)
        assert report.passed, report.reason
