"""Fleet simulation: real Edgewise servers and agents driven on one machine, with network
and hardware profiles, scripted faults, invariant checks and a report."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._faults import PowerCut
from ._fleet import Fleet, FleetResult, run_fleet
from ._invariants import InvariantResult, check_invariants
from ._network import DeviceLink, LinkStats, SimTransport
from ._processes import AgentProcess, ServerProcess, edgewise_command, free_port
from ._report import write_report
from ._scenario import Scenario, load_scenario

__all__ = [
    "AgentProcess",
    "DeviceLink",
    "Fleet",
    "FleetResult",
    "InvariantResult",
    "LinkStats",
    "PowerCut",
    "Scenario",
    "ServerProcess",
    "SimTransport",
    "check_invariants",
    "edgewise_command",
    "free_port",
    "load_scenario",
    "run_fleet",
    "run_scenario",
    "write_report",
]


def run_scenario(scenario: Scenario, out: Path, *, workdir: Path | None = None,
                 keep: bool = False,
                 progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], bool]:
    """Run a scenario, check its invariants and expectations, write the report to `out`.
    Returns (summary, passed). Device state lives in `workdir` (a temp dir unless given)."""
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="edgewise-sim-")) if own else Path(workdir)
    try:
        return run_fleet(scenario, work, progress=progress,
                         after=lambda result: write_report(result, out))
    finally:
        if own and not keep:
            shutil.rmtree(work, ignore_errors=True)
