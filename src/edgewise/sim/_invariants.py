"""Invariants checked after every scenario, against the devices' own disks and the server's
database (read directly: the records themselves, not an API's view of them).

1. working-model:   every device's active slot holds a bundle that verifies and passes its
                    health check (on that device's hardware). A failure here is a bricked device.
2. assigned-only:   every device runs a release the server assigned it at some point, and the
                    device and the server agree on which one.
3. failures-logged: every step a device recorded (failures included) is in the server's event
                    log, and no report is still waiting in a device's outbox.
4. nothing-lost:    every enrolled device, both releases and the rollout are in the database,
                    and every event that existed before a server restart still exists.
5. decided-once:    the rollout advanced each stage at most once and assigned each device at
                    most once, whichever replica's tick did it (replicas, restarts).
6. working-components: every component of the scenario (config files) is on every device,
                    committed at its baseline or its candidate release, its active slot
                    verifies, and its stable `current` path shows exactly those files, which
                    parse. A failure here is a component bricked or lost.
Invariants 2 and 3 cover every component: the device's and the server's release agree per
component (the model's on `Device`, the others' on `DeviceComponent`), and the history the
device reports holds every component's steps.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from ..agent import StateDir, health_check
from ..agent._configs import current_link
from ..agent._slots import SlotStore
from ..agent._store import AgentRecord
from ..artifacts import (
    BundleError,
    ConfigManifest,
    check_config_formats,
    file_sha256,
    read_manifest,
)
from ._faults import hardware_health_check

__all__ = ["InvariantResult", "check_invariants", "db_size_bytes", "db_snapshot"]

_MAX_LISTED = 20


@dataclass
class InvariantResult:
    name: str
    violations: list[str] = field(default_factory=list)
    count: int = 0  # violations (the list keeps the first few)

    @property
    def ok(self) -> bool:
        return self.count == 0

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.violations) < _MAX_LISTED:
            self.violations.append(message)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "count": self.count,
                "violations": self.violations}


def _engine(db_url: str):
    from ..server._db import make_engine, normalise_url

    return make_engine(normalise_url(db_url))


def db_snapshot(db_url: str) -> dict[str, int]:
    from ..server.devices.models import Device
    from ..server.events.models import Event

    engine = _engine(db_url)
    try:
        with engine.connect() as conn:
            max_id = conn.execute(select(func.max(Event.id))).scalar() or 0
            return {"events": conn.execute(select(func.count(Event.id))).scalar() or 0,
                    "max_event_id": max_id,
                    "devices": conn.execute(select(func.count(Device.id))).scalar() or 0}
    finally:
        engine.dispose()


def db_size_bytes(db_url: str) -> int:
    if db_url.startswith("sqlite"):
        path = Path(db_url.split("///", 1)[1])
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    from sqlalchemy import text

    engine = _engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT pg_database_size(current_database())"))
                       .scalar())
    finally:
        engine.dispose()


def _slot_check(state_dir: Path, check, checked: dict, key_extra: str) -> str | None:
    """None if the active slot holds a working model, else why not."""
    slots = SlotStore(StateDir(state_dir).slots_dir)
    active = slots.active()
    if active is None:
        return "no active slot"
    path = slots.path(active)
    try:
        manifest = read_manifest(path)
        for rel, entry in manifest.files.items():  # the slot adds only slot.json
            if file_sha256(path / rel)[0] != entry.sha256:
                return f"active slot {active}: {rel} does not match its sha256"
    except (BundleError, OSError) as exc:
        return f"active slot {active} does not verify: {exc}"
    key = (manifest.name, manifest.version, key_extra)
    if checked is not None and key in checked:
        return checked[key]
    try:
        report = check(path)
        verdict = None if report.passed else f"health check fails: {report.reason}"
    except Exception as exc:  # HealthCheckFailed, UpdateRejected, onnxruntime errors
        verdict = f"health check fails: {exc}"
    if checked is not None:
        checked[key] = verdict
    return verdict


def _component_check(state_dir: Path, lane: AgentRecord | None, name: str,
                     releases: set[str]) -> str | None:
    """None if config component `name` is committed at one of `releases`, its active slot
    verifies and its current files are that slot's and parse, else why not."""
    if lane is None or lane.installed is None:
        return "not installed"
    if lane.installed.release_id not in releases:
        return f"committed {lane.installed.label}, neither its baseline nor its candidate"
    paths = StateDir(state_dir)
    slots = SlotStore(paths.slots_dir / "components" / name)
    active = slots.active()
    if active is None or active != lane.installed_slot:
        return f"active slot {active}, the agent committed slot {lane.installed_slot}"
    path = slots.path(active)
    if (slots.meta(active) or {}).get("release_id") != lane.installed.release_id:
        return f"active slot {active} holds {(slots.meta(active) or {}).get('release_id')}"
    try:
        manifest = read_manifest(path)
        for rel, entry in manifest.files.items():
            if file_sha256(path / rel)[0] != entry.sha256:
                return f"active slot {active}: {rel} does not match its sha256"
        link = current_link(paths.root / "config", name)
        if not link.is_symlink() or link.resolve() != path.resolve():
            return f"{link} does not show the active slot {active}"
        if isinstance(manifest, ConfigManifest):
            check_config_formats(link, manifest)
    except (BundleError, OSError) as exc:
        return f"active slot {active} does not verify: {exc}"
    return None


def check_invariants(result) -> list[InvariantResult]:
    from ..server.devices.models import Device, DeviceComponent
    from ..server.events.models import Event
    from ..server.releases.models import Release
    from ..server.rollouts.models import Rollout

    working = InvariantResult("working-model")
    assigned = InvariantResult("assigned-only")
    logged = InvariantResult("failures-logged")
    lost = InvariantResult("nothing-lost")
    once = InvariantResult("decided-once")
    components = InvariantResult("working-components")
    names = [c.name for c in result.scenario.components]
    sample = result.scenario.invariant_health == "sample"
    checked: dict | None = {} if sample else None

    engine = _engine(result.db_url)
    try:
        with engine.connect() as conn:
            servers = {row.id: row for row in conn.execute(
                select(Device.id, Device.release_id, Device.state))}
            server_components = {(row.device_id, row.component): row.release_id
                                 for row in conn.execute(select(
                                     DeviceComponent.device_id, DeviceComponent.component,
                                     DeviceComponent.release_id))}
            events_by_device: dict[str, Counter] = {}
            assigned_by_device: dict[str, set] = {}
            for dev_id, kind, state, rel in conn.execute(
                    select(Event.device_id, Event.kind, Event.state, Event.release_id)
                    .where(Event.device_id.is_not(None))):
                events_by_device.setdefault(dev_id, Counter())[(kind, state)] += 1
                if kind in ("assigned", "rollback-assigned"):
                    assigned_by_device.setdefault(dev_id, set()).add(rel)
            releases = {r for (r,) in conn.execute(select(Release.id))}
            rollouts = {r for (r,) in conn.execute(select(Rollout.id))}
            if result.rollout_id:
                decisions = Counter(conn.execute(
                    select(Event.kind, Event.device_id)
                    .where(Event.rollout_id == result.rollout_id,
                           Event.kind.in_(("assigned", "rollout-stage-advanced")))).all())
                stages = len(result.scenario.rollout.stages.split(","))
                advanced = sum(n for (kind, _d), n in decisions.items()
                               if kind == "rollout-stage-advanced")
                if advanced > stages - 1:
                    once.add(f"{advanced} stage advances for {stages} stages")
                for (kind, device_id), n in decisions.items():
                    if kind == "assigned" and n > 1:
                        once.add(f"device {device_id} assigned {n} times by the rollout")
            for snap in (r["snapshot"] for r in result.restarts):
                still = conn.execute(select(func.count(Event.id)).where(
                    Event.id <= snap["max_event_id"])).scalar() or 0
                if still < snap["events"]:
                    lost.add(f"{snap['events'] - still} events recorded before a server "
                             "restart are gone")
    finally:
        engine.dispose()

    for rid in result.release_ids.values():
        if rid not in releases:
            lost.add(f"release {rid} is missing")
    if result.rollout_id and result.rollout_id not in rollouts:
        lost.add(f"rollout {result.rollout_id} is missing")

    devices = [(d.name, d.state_dir, d.device_id, d.hardware) for d in result.devices]
    devices += [(p.name, p.state_dir, p.device_id, None) for p in result.proc_devices]
    for name, state_dir, device_id, hw in devices:
        check = (hardware_health_check(hw) if hw is not None else None) or health_check
        why = _slot_check(state_dir, check, checked, hw.name if hw is not None else "")
        if why is not None:
            working.add(f"{name}: {why}")
        server = servers.get(device_id)
        if server is None:
            lost.add(f"{name}: device {device_id} is not in the server's database")
            continue
        rec = StateDir(state_dir).load_record()
        local = rec.installed.release_id if rec.installed else None
        if local != server.release_id:
            assigned.add(f"{name}: runs {local}, the server thinks {server.release_id}")
        if local is not None and local not in assigned_by_device.get(device_id, set()):
            assigned.add(f"{name}: runs {local}, which it was never assigned")
        slots = SlotStore(StateDir(state_dir).slots_dir)
        active = slots.active()
        meta = slots.meta(active) if active else None
        if rec.installed is not None and (meta or {}).get("release_id") != local:
            assigned.add(f"{name}: the active slot holds {(meta or {}).get('release_id')}, "
                         f"the agent committed {local}")
        for component in names:
            lane = rec.components.get(component)
            ids = {result.release_ids.get(f"{component}:{w}") for w in ("baseline", "candidate")}
            why = _component_check(state_dir, lane, component, ids - {None})
            if why is not None:
                components.add(f"{name}: {component}: {why}")
            local_c = lane.installed.release_id if lane and lane.installed else None
            server_c = server_components.get((device_id, component))
            if local_c != server_c:
                assigned.add(f"{name}: {component}: runs {local_c}, the server thinks "
                             f"{server_c}")
            if local_c is not None and local_c not in assigned_by_device.get(device_id, set()):
                assigned.add(f"{name}: {component}: runs {local_c}, which it was never "
                             "assigned")
        if rec.outbox:
            logged.add(f"{name}: {len(rec.outbox)} reports never reached the server")
        server_events = events_by_device.get(device_id, Counter())
        local_events = Counter((h["event"], h["state"]) for h in rec.history)
        for key, n in local_events.items():
            if server_events[key] < n:
                logged.add(f"{name}: {n - server_events[key]} x {key[0]} in {key[1]} "
                           "missing from the event log")
    return [working, assigned, logged, lost, once, components]
