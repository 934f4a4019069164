"""The scenario report: a JSON summary, PNG plots and a short markdown page, and the verdict
against the scenario's expectations.

Invariant: the verdict is computed from the summary alone (`evaluate`), so what the report
shows is exactly what decided the exit code.
"""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from pathlib import Path
from typing import Any

from ._invariants import InvariantResult, check_invariants, db_size_bytes

__all__ = ["classify_failure", "evaluate", "summarize", "write_report"]

FAILURE_EVENTS = ("error", "unhealthy", "resumed")


def classify_failure(event: str, message: str) -> str:
    m = message.lower()
    if event == "resumed":
        return "power-cut"
    if "no space left" in m:
        return "disk-full"
    if "is invalid: its check" in m or "are unreadable" in m:
        return "invalid-config"  # files a config release's own check refuses
    if "cannot run on" in m or "health check" in m or "golden" in m or "latency" in m:
        return "health-check"
    if "length" in m or "hash" in m or "verif" in m or "signature" in m or "bundle rejected" in m:
        return "corrupt-download"
    if "outage" in m or "connect" in m or "http 5" in m or "timed out" in m or "timeout" in m:
        return "network"
    if "state loop" in m:
        return "crash-loop"
    return "other"


def summarize(result, invariants: list[InvariantResult]) -> dict[str, Any]:
    from ._fleet import lane_of

    sc = result.scenario
    rolled = sc.rollout.component
    ids = {"model": (result.release_ids["baseline"], result.release_ids["candidate"])}
    ids.update({c.name: (result.release_ids[f"{c.name}:baseline"],
                         result.release_ids.get(f"{c.name}:candidate")) for c in sc.components})
    # Per component: devices on its baseline / candidate / neither, and in each agent state.
    per: dict[str, dict[str, Counter]] = {
        c: {"on_release": Counter(), "final_states": Counter()} for c in ids}
    causes = Counter()
    for d in result.devices:
        rec = d.record()
        for component, (base, cand) in ids.items():
            lane = lane_of(rec, component)
            rid = lane.installed.release_id if lane and lane.installed else None
            per[component]["on_release"]["candidate" if rid is not None and rid == cand else
                                         "baseline" if rid == base else "none"] += 1
            per[component]["final_states"][lane.state.value if lane else "absent"] += 1
        for h in rec.history:
            if h["event"] in FAILURE_EVENTS:
                causes[classify_failure(h["event"], h["message"])] += 1
    faulty = sum(1 for d in result.devices if d.faults) + len(result.proc_devices)
    fired_cuts = sum(d.power_cuts for d in result.devices)
    armed_cuts = sum(1 for d in result.devices if d.power_cut is not None)
    inv = {i.name: i for i in invariants}
    on, states = per[rolled]["on_release"], per["model"]["final_states"]
    total = len(result.devices) + len(result.proc_devices)
    with result.stats.lock:
        lat = sorted(result.stats.latencies_ms)
    return {
        "scenario": sc.name,
        "devices": total,
        "in_process_devices": len(result.devices),
        "process_devices": len(result.proc_devices),
        "faulty": faulty,
        "stages": len(sc.rollout.stages.split(",")),
        "db": sc.server.db,
        "rollout": {k: result.rollout.get(k) for k in ("id", "status", "stage", "stage_index",
                                                         "reason", "progress")},
        "rolled_out": rolled,
        # The rolled-out component's; the model's states; every component's in `components`.
        "on_release": dict(on),
        "on_candidate_fraction": round(on["candidate"] / max(len(result.devices), 1), 4),
        "final_states": dict(states),
        "components": {c: {k: dict(v) for k, v in counts.items()} for c, counts in per.items()},
        "bricked": inv["working-model"].count + inv["working-components"].count,
        "lost_records": inv["nothing-lost"].count + inv["failures-logged"].count,
        "invariants": [i.to_json() for i in invariants],
        "failures_by_cause": dict(causes),
        "faults": {
            "power_cuts_armed": armed_cuts, "power_cuts_fired": fired_cuts,
            "disk_full": sum(1 for d in result.devices if "disk-full" in d.faults),
            "damaged_downloads": result.stats.damaged,
            "clock_skew": sum(1 for d in result.devices if "clock-skew" in d.faults),
            "dropped_requests": result.stats.dropped,
            "server_restarts": result.restarts,
            "replica_kills": result.replica_kills,
            "broker_outages": result.broker_outages,
            "process_kills": [{"device": p.name, "fault": p.fault, "exit_codes": p.exit_codes}
                              for p in result.proc_devices],
        },
        "push": result.push,
        "agent_crashes": sum(len(d.crashes) for d in result.devices),
        "agent_crash_samples": [c for d in result.devices for c in d.crashes][:10],
        "timings_s": {k: round(v, 2) for k, v in result.timings.items() if k != "cpu_s"},
        "cpu_s": result.timings.get("cpu_s", {}),
        "wall_s": round(result.timings.get("rollout_s", 0.0), 2),
        "timed_out": result.timed_out,
        "requests": result.stats.requests,
        "bytes_down": result.stats.bytes_down,
        "bytes_up": result.stats.bytes_up,
        "checkin_latency_ms": ({"p50": round(lat[len(lat) // 2], 2),
                                "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2),
                                "n": len(lat)} if lat else None),
        "server_rss_mb_max": round(result.server_rss_mb_max, 1),
        "db_bytes": db_size_bytes(result.db_url),
        "load_avg": result.load_avg,
        "machine": f"{os.cpu_count()}-core {platform.machine()}",
    }


def evaluate(summary: dict[str, Any], expect) -> list[dict[str, Any]]:
    """One row per expectation: name, expected, actual, ok."""
    rows = []

    def row(name: str, expected: Any, actual: Any, ok: bool) -> None:
        rows.append({"name": name, "expected": expected, "actual": actual, "ok": bool(ok)})

    roll = summary["rollout"]
    row("finished in time", "no timeout", "timed out" if summary["timed_out"] else "finished",
        not summary["timed_out"])
    if expect.rollout is not None:
        row("rollout status", expect.rollout, roll["status"], roll["status"] == expect.rollout)
    if expect.final_stage is not None:
        row("final stage", expect.final_stage, roll["stage"], roll["stage"] == expect.final_stage)
    frac = summary["on_candidate_fraction"]
    if expect.min_on_candidate is not None:
        row("on candidate >=", expect.min_on_candidate, frac, frac >= expect.min_on_candidate)
    if expect.max_on_candidate is not None:
        row("on candidate <=", expect.max_on_candidate, frac, frac <= expect.max_on_candidate)
    row("bricked <=", expect.max_bricked, summary["bricked"],
        summary["bricked"] <= expect.max_bricked)
    row("lost records <=", expect.max_lost_records, summary["lost_records"],
        summary["lost_records"] <= expect.max_lost_records)
    if expect.max_wall_s is not None:
        row("rollout wall time <=", expect.max_wall_s, summary["wall_s"],
            summary["wall_s"] <= expect.max_wall_s)
    if expect.invariants:
        for inv in summary["invariants"]:
            row(f"invariant {inv['name']}", 0, inv["count"], inv["ok"])
    row("agent crashes", 0, summary["agent_crashes"], summary["agent_crashes"] == 0)
    push = summary.get("push")
    if push is not None:  # every device's MQTT client is back after any broker outage
        row("push clients connected", push["devices"], push["connected_at_end"],
            push["connected_at_end"] == push["devices"])
    return rows


def _plots(out: Path, timeline: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if not timeline:
        return files
    t = [s["t"] for s in timeline]
    load = f"load avg {summary['load_avg']['start'][0]:.1f} -> {summary['load_avg']['end'][0]:.1f}"

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        files.append(name)

    states = sorted({k for s in timeline for k in s["states"]})
    fig, ax = plt.subplots(figsize=(8, 4))
    for st in states:
        ax.plot(t, [s["states"].get(st, 0) for s in timeline], label=st)
    ax.set(xlabel="s", ylabel="devices", title=f"Devices per agent state ({load})")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "states.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    for key in ("assigned", "committed", "rolled-back", "failed"):
        ax.plot(t, [(s["progress"] or {}).get(key, 0) for s in timeline], label=key)
    ax2 = ax.twinx()
    ax2.step(t, [s["stage_index"] if s["stage_index"] is not None else -1 for s in timeline],
             color="k", where="post", label="stage index")
    ax2.set_ylabel("stage index")
    ax.set(xlabel="s", ylabel="rollout devices", title="Stage progression")
    ax.legend(fontsize=7, loc="upper left")
    save(fig, "stages.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [s["bytes_down"] / 2**20 for s in timeline])
    ax.set(xlabel="s", ylabel="MiB", title="Bytes transferred to devices (cumulative)")
    save(fig, "bytes.png")

    causes = summary["failures_by_cause"] or {"none": 0}
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(list(causes), list(causes.values()))
    ax.set(ylabel="events", title="Failures by cause (device history)")
    save(fig, "failures.png")
    return files


def _markdown(summary: dict[str, Any], rows: list[dict[str, Any]], plots: list[str],
              passed: bool) -> str:
    roll = summary["rollout"]
    lines = [
        f"# Scenario {summary['scenario']}: {'PASSED' if passed else 'FAILED'}", "",
        f"{summary['devices']} devices ({summary['faulty']} faulty), "
        f"{summary['stages']} stages, {summary['db']}; rollout {roll['status']} at stage "
        f"{roll['stage']} in {summary['wall_s']} s ({roll['reason']}).",
        f"Rolled out: {summary['rolled_out']}. On the candidate: "
        f"{summary['on_candidate_fraction']:.1%}; bricked: "
        f"{summary['bricked']}; lost records: {summary['lost_records']}.",
        f"Server RSS max {summary['server_rss_mb_max']} MB, database "
        f"{summary['db_bytes'] / 2**20:.1f} MiB; machine {summary['machine']}, load average "
        f"{summary['load_avg']['start'][0]:.2f} at start, {summary['load_avg']['end'][0]:.2f} "
        "at end.", "",
        "| expectation | expected | actual | ok |", "|---|---|---|---|",
        *[f"| {r['name']} | {r['expected']} | {r['actual']} | {'yes' if r['ok'] else '**NO**'} |"
          for r in rows], "",
        "| component | on baseline | on candidate | on neither | final states |",
        "|---|---|---|---|---|",
        *[f"| {c} | {v['on_release'].get('baseline', 0)} | {v['on_release'].get('candidate', 0)}"
          f" | {v['on_release'].get('none', 0)} | "
          f"{', '.join(f'{k} {n}' for k, n in sorted(v['final_states'].items()))} |"
          for c, v in summary["components"].items()], "",
        "## Failures by cause", "",
        *[f"- {k}: {v}" for k, v in sorted(summary["failures_by_cause"].items())], "",
    ]
    bad = [i for i in summary["invariants"] if not i["ok"]]
    if bad:
        lines += ["## Invariant violations", ""]
        for inv in bad:
            lines += [f"- **{inv['name']}** ({inv['count']}):",
                      *[f"  - {v}" for v in inv["violations"]]]
        lines.append("")
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(result, out: Path) -> tuple[dict[str, Any], bool]:
    """Check the invariants, write summary.json, timeline.json, PNGs and report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    invariants = check_invariants(result)
    summary = summarize(result, invariants)
    rows = evaluate(summary, result.scenario.expect)
    passed = all(r["ok"] for r in rows)
    summary["expectations"] = rows
    summary["passed"] = passed
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "timeline.json").write_text(json.dumps(result.timeline))
    plots = _plots(out, result.timeline, summary)
    (out / "report.md").write_text(_markdown(summary, rows, plots, passed))
    return summary, passed
