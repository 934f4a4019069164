"""Table-driven power cuts: SIGKILL the real agent process in every in-flight state, before
and after the state's side effect, restart it, and check the device ends consistent: on the
old or the new release, never without a working model."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from edgewise.agent import agent_status, health_check
from tests.test_e2e_update import run_once, server_device

GOOD, BROKEN = "good", "broken"

# (v2 kind, state to cut power in, when, expected final state, expected release)
CASES = [
    (kind, state, when, final, release)
    for kind, states, final, release in [
        (GOOD, ["downloading", "verifying", "installing", "activating", "health-checking"],
         "committed", "tiny@2.0.0"),
        (BROKEN, ["downloading", "verifying", "installing", "activating", "health-checking",
                  "rolling-back"], "rolled-back", "tiny@1.0.0"),
    ]
    for state in states
    for when in ("before", "after")
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "state", "when", "final", "release"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_power_cut_in_every_state(live_server, enroll_agent, tiny_bundle, tmp_path: Path,
                                  kind: str, state: str, when: str, final: str,
                                  release: str) -> None:
    agent = enroll_agent("crashy")
    v1 = live_server.publish(tiny_bundle("1.0.0"))
    assert run_once(agent, tmp_path) == 0
    v2 = live_server.publish(tiny_bundle("2.0.0", broken=kind == BROKEN))

    # The power cut really happens in that state (the process dies by SIGKILL)...
    assert run_once(agent, tmp_path, fault=f"{state}:{when}") == -signal.SIGKILL
    saved = json.loads((agent / "state.json").read_text())["state"]
    assert saved == state if when == "before" else saved in (state, final)
    # ...and the device still has a working model while it is down.
    assert_working_model(agent, broken_v2_may_be_live=kind == BROKEN)

    # The restarted agent resumes and finishes the update (or its rollback).
    assert run_once(agent, tmp_path) == 0
    status = agent_status(agent)
    assert (status["state"], status["release"]) == (final, release)
    assert_working_model(agent, expect=release)

    device = server_device(live_server, agent)
    assert device["state"] == final
    assert device["release_id"] == (v2 if final == "committed" else v1)["id"]
    events = [e["event"] for e in status["history"]]
    if when == "before" or saved == state:
        assert "resumed" in events


def assert_working_model(agent: Path, *, expect: str | None = None,
                         broken_v2_may_be_live: bool = False) -> None:
    slots = agent / "slots"
    active = (slots / "active").read_text().strip()
    meta = json.loads((slots / active / "slot.json").read_text())
    live = f"{meta['name']}@{meta['version']}"
    report = health_check(slots / active)
    if expect is not None:
        assert live == expect
    # Mid-update the live slot holds the old release or, after activation, the new one; a
    # broken new release is live only until the restarted agent rolls it back.
    if not (broken_v2_may_be_live and live == "tiny@2.0.0"):
        assert report.passed, report.reason
