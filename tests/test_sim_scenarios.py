"""Rehearsals end to end: every shipped scenario passes its expectations and invariants, and
`edgewise sim run` exits non-zero when a scenario's expectations are not met."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from edgewise.sim import edgewise_command, load_scenario, run_scenario

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
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is False
    assert summary["rollout"]["status"] == "aborted"
    assert summary["bricked"] == 0  # the failing rehearsal still leaves every device working
    failed = {r["name"] for r in summary["expectations"] if not r["ok"]}
    assert failed == {"rollout status", "on candidate >="}
