"""Rehearsals end to end: every shipped scenario passes its expectations and invariants,
`edgewise sim run` exits non-zero when a scenario's expectations are not met, and a config
component is rolled out (or stopped at its canary) like a model, its invariants checked on
every device's disk."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from edgewise.sim import (
    check_invariants,
    edgewise_command,
    load_scenario,
    run_fleet,
    run_scenario,
    write_report,
)

pytestmark = pytest.mark.slow

SCENARIOS = sorted((Path(__file__).parent.parent / "scenarios").glob("*.yaml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_shipped_scenario_passes(path: Path, tmp_path: Path) -> None:
    summary, passed = run_scenario(load_scenario(path), tmp_path / "report",
                                   workdir=tmp_path / "work")
    failed = [r for r in summary["expectations"] if not r["ok"]]
    assert passed, (failed, [i for i in summary["invariants"] if not i["ok"]])
    assert summary["bricked"] == 0 and summary["lost_records"] == 0
    for name in ("summary.json", "report.md", "states.png", "stages.png", "bytes.png",
                 "failures.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_violated_expectations_exit_non_zero(tmp_path: Path) -> None:
    # A broken candidate with a scenario that (wrongly) expects it to reach everyone.
    scenario = tmp_path / "wrong.yaml"
    scenario.write_text(
        "name: wrong-expectations\ndevices: 4\nworkers: 2\npoll_interval_s: 0.3\n"
        "timeout_s: 120\ncandidate: {version: 2.0.0, broken: true}\n"
        "rollout: {stages: 'canary:1,broad:100%', gates: {max_latency_ratio: null, "
        "max_memory_ratio: null}}\n"
        "expect: {rollout: completed, min_on_candidate: 1.0}\n")
    out = tmp_path / "report"
    proc = subprocess.run(edgewise_command("sim", "run", str(scenario), "--out", str(out)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "model (rolled out): on baseline 4," in proc.stderr  # per component, as summarized
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is False
    assert summary["rollout"]["status"] == "aborted"
    assert summary["bricked"] == 0  # the failing rehearsal still leaves every device working
    failed = {r["name"] for r in summary["expectations"] if not r["ok"]}
    assert failed == {"rollout status", "on candidate >="}


def test_a_config_component_is_rolled_out_through_power_cuts_disk_full_and_corruption(
        tmp_path: Path) -> None:
    """config-rollout.yaml: the config files reach the fleet in stages while the model stays
    on its baseline; the faults fired on the component's update; a device whose current
    files were damaged afterwards is caught by the working-components invariant."""
    scenario = load_scenario(Path(__file__).parent.parent / "scenarios" / "config-rollout.yaml")

    def after(result):
        summary, passed = write_report(result, tmp_path / "report")
        dev = result.devices[0]
        current = dev.state_dir / "config" / "site" / "current"
        files = {p.name: p.read_text() for p in current.iterdir() if p.is_file()}
        (current / "settings.json").write_text("{broken")  # damage the active slot's files
        damaged = {i.name: i for i in check_invariants(result)}["working-components"]
        return summary, passed, files, damaged

    summary, passed, files, damaged = run_fleet(scenario, tmp_path / "work", after=after)
    assert passed, [r for r in summary["expectations"] if not r["ok"]]
    assert summary["rolled_out"] == "site" and summary["rollout"]["status"] == "completed"
    site = summary["components"]["site"]
    assert site["on_release"].get("candidate", 0) >= 27
    assert sum(site["on_release"].values()) == 30 and "none" not in site["on_release"]
    assert summary["components"]["model"]["on_release"] == {"baseline": 30}
    assert '"version": "2.0.0"' in files["settings.json"] and files["mode.txt"] == "ok\n"
    causes = summary["failures_by_cause"]
    assert causes.get("power-cut", 0) >= 5 and causes.get("disk-full", 0) >= 1 and \
        causes.get("corrupt-download", 0) >= 1
    assert {i["name"]: i["ok"] for i in summary["invariants"]}["working-components"]
    assert damaged.count == 1 and "sim-00000: site: active slot" in damaged.violations[0]


def test_a_config_release_that_fails_its_check_stops_at_the_canary(tmp_path: Path) -> None:
    scenario = load_scenario(Path(__file__).parent.parent / "scenarios" /
                             "config-canary-failure.yaml")
    summary, passed = run_scenario(scenario, tmp_path / "report", workdir=tmp_path / "work")
    assert passed, [r for r in summary["expectations"] if not r["ok"]]
    assert summary["rollout"]["status"] == "aborted" and summary["rollout"]["stage"] == "canary"
    # The gate may abort on the first canary's failure, before the second one has tried.
    failed = summary["rollout"]["progress"]["failed"]
    assert failed in (1, 2)
    site = summary["components"]["site"]
    assert site["on_release"] == {"baseline": 20}
    assert site["final_states"].get("failed", 0) <= 2 and \
        site["final_states"]["committed"] >= 18 and sum(site["final_states"].values()) == 20
    assert summary["failures_by_cause"] == {"invalid-config": site["final_states"]["failed"]}
    assert summary["components"]["model"]["on_release"] == {"baseline": 20}
