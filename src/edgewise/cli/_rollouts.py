"""Operator commands for groups and rollouts."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ._common import console, fail, out, print_json
from ._ops import JsonOpt, ServerOpt, TokenOpt, _api_errors, _client

groups_app = typer.Typer(help="Device groups (static or tag-based) and their windows.",
                         no_args_is_help=True)
rollout_app = typer.Typer(help="Staged rollouts: create, watch, pause, resume, abort, "
                          "roll back.", no_args_is_help=True)


def _window(window: str | None) -> dict | None:
    if window is None:
        return None
    try:
        return json.loads(window)
    except ValueError as exc:
        fail(f"--window must be JSON: {exc}")


@groups_app.command("create")
def groups_create(
    name: str, server: ServerOpt, token: TokenOpt,
    device: Annotated[list[str] | None, typer.Option("--device", help="member (static)")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="selector tag (dynamic)")]
    = None,
    window: Annotated[str | None, typer.Option(help='JSON, e.g. {"days": "daily", "start": '
                                              '"02:00", "duration_min": 120, "max_defer_s": 0}')]
    = None,
) -> None:
    """A static group (--device ...) or a dynamic one (--tag ...)."""
    body = {"name": name, "kind": "dynamic" if tag else "static", "selector": tag or [],
            "members": device or [], "window": _window(window)}
    try:
        with _client(server, token) as client:
            group = client.request("POST", "/api/v1/groups", json=body).json()
    except _api_errors() as exc:
        fail(str(exc))
    console.print(f"group {group['name']} ({group['kind']}): {len(group['devices'])} devices")


@groups_app.command("profile")
def groups_profile(
    name: str, server: ServerOpt, token: TokenOpt,
    max_ram: Annotated[float | None, typer.Option("--max-ram", help="peak RSS budget, MB")]
    = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="latency budget, ms")] = None,
    min_accuracy: Annotated[float | None, typer.Option(help="0.85 or 85")] = None,
    threads: Annotated[int, typer.Option(help="threads the device gives the model")] = 1,
    stat: Annotated[str, typer.Option(help="latency statistic: p50 or p95")] = "p95",
    slowdown: Annotated[float, typer.Option(help="device latency / this machine's")] = 1.0,
    max_size_mb: Annotated[float | None, typer.Option(help="model file budget, MB")] = None,
    hardware: Annotated[list[str] | None, typer.Option(
        "--hardware", help="hardware id of the group's devices (repeat)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the group's device profile, or store one (any option given) for `edgewise fit
    --group` and per-hardware release variants."""
    setting = any(v is not None for v in (max_ram, max_latency_ms, min_accuracy, max_size_mb,
                                          hardware))
    if min_accuracy is not None and min_accuracy > 1:
        min_accuracy /= 100.0
    try:
        with _client(server, token) as client:
            if setting:
                profile = client.request("PUT", f"/api/v1/groups/{name}/profile", json={
                    "max_ram_mb": max_ram, "max_latency_ms": max_latency_ms,
                    "min_accuracy": min_accuracy, "threads": threads, "latency_stat": stat,
                    "slowdown": slowdown, "max_size_mb": max_size_mb,
                    "hardware": hardware or []}).json()
            else:
                profile = client.request("GET", f"/api/v1/groups/{name}/profile").json()
    except _api_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json(profile)
        return
    shown = ", ".join(f"{k}={v}" for k, v in profile.items() if k != "group" and v not in
                      (None, []))
    console.print(f"group {name} profile: {shown}")


@groups_app.command("list")
def groups_list(server: ServerOpt, token: TokenOpt, as_json: JsonOpt = False) -> None:
    try:
        with _client(server, token) as client:
            groups = client.request("GET", "/api/v1/groups").json()
    except _api_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json(groups)
        return
    table = Table("name", "kind", "selector", "devices", "window")
    for g in groups:
        table.add_row(g["name"], g["kind"], ",".join(g["selector"]), str(len(g["devices"])),
                      json.dumps(g["window"]) if g["window"] else "-")
    out.print(table)


@rollout_app.command("create")
def rollout_create(
    release_id: str, server: ServerOpt, token: TokenOpt,
    group: Annotated[str, typer.Option(help="target group")],
    stages: Annotated[str, typer.Option(help="NAME:COUNT or NAME:PERCENT%, comma-separated")]
    = "canary:1,field-test:20%,broad:100%",
    min_soak_s: Annotated[float, typer.Option(help="minimum time per stage")] = 0,
    abort_failure_rate: float = 0.2,
    pause_failure_rate: float = 0.0,
    min_reporting: Annotated[float, typer.Option(help="fraction of a stage that must finish")]
    = 1.0,
    max_latency_ratio: Annotated[float, typer.Option(help="p95 vs previous release")] = 1.5,
    max_memory_ratio: float = 1.5,
    max_flag_rate: Annotated[float | None, typer.Option(help="wrong-prediction flags per "
                                                         "device")] = None,
    min_rating: float | None = None,
    max_anomalous_share: Annotated[float | None, typer.Option(
        help="pause when more of the inputs than this look anomalous to the release's "
        "detector (drift)")] = None,
) -> None:
    """Roll a release out to a group in stages, gated by failures and model health."""
    body = {"release_id": release_id, "group": group, "stages": stages,
            "min_soak_s": min_soak_s,
            "gates": {"abort_failure_rate": abort_failure_rate,
                      "pause_failure_rate": pause_failure_rate, "min_reporting": min_reporting,
                      "max_latency_ratio": max_latency_ratio,
                      "max_memory_ratio": max_memory_ratio, "max_flag_rate": max_flag_rate,
                      "min_rating": min_rating, "max_anomalous_share": max_anomalous_share}}
    try:
        with _client(server, token) as client:
            rollout = client.request("POST", "/api/v1/rollouts", json=body).json()
    except _api_errors() as exc:
        fail(str(exc))
    console.print(f"rollout {rollout['id']}: {release_id} -> group {group}, stage "
                  f"{rollout['stage']}")
    print_json({"rollout_id": rollout["id"]})


@rollout_app.command("list")
def rollout_list(server: ServerOpt, token: TokenOpt, as_json: JsonOpt = False) -> None:
    try:
        with _client(server, token) as client:
            rollouts = client.request("GET", "/api/v1/rollouts").json()
    except _api_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json(rollouts)
        return
    table = Table("id", "release", "group", "status", "stage", "committed", "failed", "reason")
    for r in rollouts:
        p = r["progress"]
        table.add_row(r["id"], r["release_id"], r["group"], r["status"],
                      f"{r['stage_index'] + 1}/{len(r['stages'])} {r['stage']}",
                      f"{p['committed']}/{p['devices']}", str(p["rolled-back"] + p["failed"]),
                      r["reason"][:60])
    out.print(table)


@rollout_app.command("status")
def rollout_status(rollout_id: str, server: ServerOpt, token: TokenOpt) -> None:
    try:
        with _client(server, token) as client:
            print_json(client.request("GET", f"/api/v1/rollouts/{rollout_id}").json())
    except _api_errors() as exc:
        fail(str(exc))


def _action(action: str):
    def command(rollout_id: str, server: ServerOpt, token: TokenOpt) -> None:
        try:
            with _client(server, token) as client:
                r = client.request("POST", f"/api/v1/rollouts/{rollout_id}/{action}").json()
        except _api_errors() as exc:
            fail(str(exc))
        console.print(f"rollout {r['id']} is now {r['status']}")

    command.__doc__ = {"pause": "Stop assigning further devices.",
                       "resume": "Continue a paused rollout.",
                       "abort": "Stop and send every touched device back to its release.",
                       "rollback": "Send every device of the rollout back to its previous "
                       "release (also after completion)."}[action]
    return command


for _name in ("pause", "resume", "abort", "rollback"):
    rollout_app.command(_name)(_action(_name))


def register(app: typer.Typer) -> None:
    app.add_typer(groups_app, name="groups")
    app.add_typer(rollout_app, name="rollout")
