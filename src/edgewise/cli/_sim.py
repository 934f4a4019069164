"""`edgewise sim`: rehearse a rollout on a simulated fleet before it reaches a device."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ._common import console, fail

sim_app = typer.Typer(help="Fleet simulator: real agents against a real server, with "
                      "network/hardware profiles and injected faults.", no_args_is_help=True)


@sim_app.command("run")
def sim_run(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML", exists=True,
                                             dir_okay=False)],
    out: Annotated[Path, typer.Option(help="report directory (summary.json, report.md, "
                                      "PNG plots)")] = Path("sim-report"),
    workdir: Annotated[Path | None, typer.Option(help="device state and server data "
                                                 "(default: a temp dir, removed after)")]
    = None,
    devices: Annotated[int | None, typer.Option(help="override the scenario's device count")]
    = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run SCENARIO; exit 1 when its expectations or invariants are not met."""
    from pydantic import ValidationError

    from ..sim import load_scenario, run_scenario

    # Thousands of agents log every retry; keep the simulator's own progress readable.
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if not verbose:
        logging.getLogger("edgewise.agent").setLevel(logging.CRITICAL)
    try:
        sc = load_scenario(scenario)
    except (ValidationError, ValueError, OSError) as exc:
        fail(f"{scenario}: {exc}")
    if devices is not None:
        sc = sc.model_copy(update={"devices": devices})
    summary, passed = run_scenario(sc, out, workdir=workdir, keep=workdir is not None,
                                   progress=lambda m: console.print(f"[dim]sim:[/] {m}"))
    for row in summary["expectations"]:
        mark = "[green]ok[/]" if row["ok"] else "[bold red]FAIL[/]"
        console.print(f"{mark} {row['name']}: expected {row['expected']}, got {row['actual']}")
    for component, counts in summary["components"].items():
        on, states = counts["on_release"], counts["final_states"]
        console.print(f"{component}{' (rolled out)' if component == summary['rolled_out'] else ''}"
                      f": on baseline {on.get('baseline', 0)}, on candidate "
                      f"{on.get('candidate', 0)}, on neither {on.get('none', 0)} ("
                      + ", ".join(f"{k} {n}" for k, n in sorted(states.items())) + ")")
    console.print(f"report: {out / 'report.md'}")
    if not passed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(sim_app, name="sim")
