"""Rollouts: the runner that applies `engine.decide` to the database, and operator actions.

Invariant: a device is assigned the rollout's release only when its stage is reached and the
rollout is active; an abort or a rollback reassigns every device the rollout touched to the
release it ran before (a new assignment of the old artifact, never a silent downgrade).
A rollout moves one component of its devices (its release's: the model or one app) and
leaves their other components alone; a group has at most one rollout in progress per
component. A device whose component the operator removed (`leave`) is out of every rollout
of that component that is not rolled back: no tick assigns it again, its outcome no longer
counts, and an abort or rollback does not put the previous release back on it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import statistics
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session, aliased

from .._db import utcnow
from .._errors import Conflict, InvalidInput, NotFound
from ..devices import service as devices
from ..devices.models import Device, InstallResult
from ..events import service as events
from ..feedback import service as feedback
from ..feedback.models import DriftReport, Feedback
from ..groups.service import get_group, member_ids
from ..releases.models import Release
from .engine import Action, DeviceOutcome, Gates, Stage, StageView, decide, stage_size
from .models import Rollout, RolloutDevice

log = logging.getLogger("edgewise.server.rollouts")

ACTIVE, PAUSED, COMPLETED, ABORTED, ROLLED_BACK = (
    "active", "paused", "completed", "aborted", "rolled-back")


def stage_to_json(stage: Stage) -> dict[str, Any]:
    return asdict(stage)


def stage_from_json(data: dict[str, Any]) -> Stage:
    data = dict(data)
    data["gates"] = Gates(**data.get("gates", {}))
    return Stage(**data)


def create_rollout(session: Session, *, release_id: str, group_name: str,
                   stages: list[Stage]) -> Rollout:
    release = session.get(Release, release_id)
    if release is None:
        raise NotFound(f"no release {release_id!r}")
    get_group(session, name=group_name)
    if not stages:
        raise InvalidInput("a rollout needs at least one stage")
    component = devices.release_component(release)
    for running in session.scalars(select(Rollout).where(
            Rollout.group_name == group_name, Rollout.status.in_((ACTIVE, PAUSED)))):
        if devices.release_component(session.get(Release, running.release_id)) == component:
            raise Conflict(f"group {group_name!r} already has rollout {running.id} of its "
                           f"{component} component in progress; finish, abort or roll it "
                           "back first")
    rollout = Rollout(id=f"ro-{secrets.token_hex(5)}", release_id=release_id,
                      group_name=group_name, stages=[stage_to_json(s) for s in stages],
                      status=ACTIVE, stage_index=0, stage_started_at=utcnow())
    session.add(rollout)
    events.record(session, kind="rollout-created", rollout_id=rollout.id, release_id=release_id,
                  message=f"rollout of {release_id} to group {group_name}: "
                  + " -> ".join(s.name for s in stages))
    session.commit()
    return rollout


def get_rollout(session: Session, *, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"no rollout {rollout_id!r}")
    return rollout


def list_rollouts(session: Session) -> list[Rollout]:
    return list(session.scalars(select(Rollout).order_by(Rollout.created_at.desc())))


def _order_key(rollout_id: str, device_id: str) -> str:
    # A stable pseudo-random order per rollout: the canary ring is not always the same device.
    return hashlib.sha256(f"{rollout_id}/{device_id}".encode()).hexdigest()


def _sync_members(session: Session, rollout: Rollout) -> list[RolloutDevice]:
    """Rollout devices in stable order; devices that joined the group since are appended."""
    rows = list(session.scalars(select(RolloutDevice).where(
        RolloutDevice.rollout_id == rollout.id).order_by(RolloutDevice.position)))
    known = {r.device_id for r in rows}
    group = get_group(session, name=rollout.group_name)
    new = sorted((d for d in member_ids(session, group=group) if d not in known),
                 key=lambda d: _order_key(rollout.id, d))
    for device_id in new:
        row = RolloutDevice(rollout_id=rollout.id, device_id=device_id, position=len(rows))
        session.add(row)
        rows.append(row)
    return rows


def leave(session: Session, *, device_id: str, component: str, actor: str) -> list[str]:
    """Take a device out of the rollouts of `component`, because the operator removed that
    component from it: every one but those rolled back (a completed or aborted rollout can
    still be rolled back, which reassigns). Each is recorded as an event. Returns the
    rollouts' ids. The caller commits."""
    left = []
    for rollout in session.scalars(select(Rollout).where(Rollout.status != ROLLED_BACK)
                                   .order_by(Rollout.created_at)):
        if devices.release_component(session.get(Release, rollout.release_id)) != component:
            continue
        if rollout.status in (ACTIVE, PAUSED):  # a member not yet synced leaves too
            rows = _sync_members(session, rollout)
        else:
            rows = list(session.scalars(select(RolloutDevice).where(
                RolloutDevice.rollout_id == rollout.id)))
        row = next((r for r in rows if r.device_id == device_id), None)
        if row is None or row.left_at is not None:
            continue
        row.left_at = utcnow()
        left.append(rollout.id)
        events.record(session, kind="rollout-left", device_id=device_id,
                      rollout_id=rollout.id, release_id=rollout.release_id,
                      message=f"out of rollout {rollout.id}: {component} removed from the "
                      f"device by {actor}")
    return left


class _Known:
    """The install results and feedback a rollout's decision reads, loaded in two queries:
    a tick over thousands of devices must not cost a query per device."""

    def __init__(self, session: Session, release_id: str, rows: list[RolloutDevice]) -> None:
        releases = {release_id} | {r.previous_release_id for r in rows if r.previous_release_id}
        # Plain rows, not ORM objects: a tick over 10,000 devices reads 20,000 of them.
        self.results = {(r.device_id, r.release_id): r for r in session.execute(
            select(InstallResult.device_id, InstallResult.release_id, InstallResult.outcome,
                   InstallResult.health, InstallResult.finished_at)
            .where(InstallResult.release_id.in_(releases)))}
        self.feedback: dict[str, list[Feedback]] = {}
        for item in session.scalars(select(Feedback).where(Feedback.release_id == release_id)):
            self.feedback.setdefault(item.device_id, []).append(item)
        self.drift = {r.device_id: (r.inputs, r.anomalous) for r in session.scalars(
            select(DriftReport).where(DriftReport.release_id == release_id))}

    def flags_rating(self, device_id: str) -> tuple[int, float | None]:
        items = self.feedback.get(device_id, [])
        ratings = [f.rating for f in items if f.rating is not None]
        return (sum(1 for f in items if f.predicted is not None),
                statistics.mean(ratings) if ratings else None)


def _outcome(session: Session, row: RolloutDevice, release_id: str,
             known: _Known | None = None) -> DeviceOutcome:
    if row.assigned_at is not None and row.previous_release_id == release_id:
        return DeviceOutcome(device_id=row.device_id, outcome="committed")  # already ran it
    if known is not None:
        result = known.results.get((row.device_id, release_id))
    else:
        result = session.get(InstallResult, (row.device_id, release_id))
    if result is None or row.assigned_at is None or result.finished_at < row.assigned_at \
            or result.outcome == "retrying":
        return DeviceOutcome(device_id=row.device_id, outcome=None)
    health = result.health or {}
    if not row.previous_release_id:
        previous = None
    elif known is not None:
        previous = known.results.get((row.device_id, row.previous_release_id))
    else:
        previous = session.get(InstallResult, (row.device_id, row.previous_release_id))
    prev_health = (previous.health or {}) if previous is not None else {}
    if known is not None:
        flags, rating = known.flags_rating(row.device_id)
        inputs, anomalous = known.drift.get(row.device_id, (0, 0))
    else:
        flags, rating = feedback.for_device(session, device_id=row.device_id,
                                            release_id=release_id)
        drift = session.get(DriftReport, (row.device_id, release_id))
        inputs, anomalous = (drift.inputs, drift.anomalous) if drift else (0, 0)
    return DeviceOutcome(
        device_id=row.device_id, outcome=result.outcome,
        golden_agreement=health.get("top1_agreement"),
        p95_latency_ms=health.get("p95_latency_ms"), memory_mb=health.get("memory_mb"),
        previous_p95_latency_ms=prev_health.get("p95_latency_ms"),
        previous_memory_mb=prev_health.get("memory_mb"),
        flags=flags, rating=rating, inputs=inputs, anomalous=anomalous)


def progress(session: Session, rollout: Rollout) -> dict[str, Any]:
    """Counts per outcome, for the API, dashboard and metrics: one grouped query (a rollout
    page of 100,000 devices must not load them). The same outcomes as `_outcome`."""
    result = aliased(InstallResult)
    outcome = case(
        (RolloutDevice.assigned_at.is_(None), "unassigned"),
        (RolloutDevice.previous_release_id == rollout.release_id, "committed"),
        (or_(result.outcome.is_(None), result.outcome == "retrying",
             result.finished_at < RolloutDevice.assigned_at), "in-progress"),
        else_=result.outcome)
    counts = {"devices": 0, "assigned": 0, "committed": 0, "rolled-back": 0, "failed": 0,
              "in-progress": 0}
    for key, n in session.execute(
            select(outcome, func.count())
            .select_from(RolloutDevice)
            .outerjoin(result, and_(result.device_id == RolloutDevice.device_id,
                                    result.release_id == rollout.release_id))
            .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.left_at.is_(None))
            .group_by(outcome)):
        counts["devices"] += n
        if key != "unassigned":
            counts["assigned"] += n
            counts[key] = counts.get(key, 0) + n
    return counts


def adapter_of(session: Session, rollout: Rollout, models=None) -> dict[str, Any] | None:
    """The rollout's release as an LLM adapter (`releases.service.adapter_base`: its base and
    bytes), None when it is not one; `models` as `releases.service.llm_models` gives them."""
    from ..releases import service as releases

    release = session.get(Release, rollout.release_id)
    if release is None or (release.manifest or {}).get("kind") != "llm-adapter":
        return None
    return releases.adapter_base(release, models if models is not None
                                 else releases.llm_models(session))


def transfer(session: Session, rollout: Rollout, *, adapter: dict[str, Any] | None = None
             ) -> dict[str, int]:
    """Bytes the rollout's devices downloaded vs the full size of what they installed, as the
    agents reported them (delta updates make the first smaller). For an LLM adapter release
    (`adapter`, from `adapter_of`) also `full_model_bytes`: what the same downloads would
    have cost had the fine-tune shipped as a full model (the base GGUF each)."""
    from ..events.models import Event

    device_ids = select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout.id)
    totals = {"downloads": 0, "bytes_sent": 0, "bytes_full": 0, "delta_files": 0,
              "delta_fallbacks": 0, "reused_files": 0}
    for detail in session.scalars(select(Event.detail).where(
            Event.kind == "downloaded", Event.release_id == rollout.release_id,
            Event.device_id.in_(device_ids))):
        totals["downloads"] += 1
        stats = (detail or {}).get("download") or {}
        totals["bytes_sent"] += int(stats.get("sent_bytes", 0))
        totals["bytes_full"] += int(stats.get("full_bytes", 0))
        totals["delta_files"] += int(stats.get("delta_files", 0))
        totals["delta_fallbacks"] += int(stats.get("delta_fallbacks", 0))
        totals["reused_files"] += int(stats.get("reused_files", 0))
    if adapter is not None and adapter["full_model_bytes"] is not None:
        totals["full_model_bytes"] = totals["downloads"] * adapter["full_model_bytes"]
    return totals


def tick(session: Session, rollout: Rollout, *, now: datetime | None = None) -> Action | None:
    """One decision step for an active rollout; returns what was done."""
    if rollout.status != ACTIVE:
        return None
    now = now or utcnow()
    stages = [stage_from_json(s) for s in rollout.stages]
    stage = stages[rollout.stage_index]
    rows = [r for r in _sync_members(session, rollout) if r.left_at is None]
    size = stage_size(stage, len(rows))
    component = devices.release_component(session.get(Release, rollout.release_id))
    for row in rows[:size]:
        if row.assigned_at is None:
            device = session.get(Device, row.device_id)
            running = devices.running_release(session, device=device, component=component)
            row.previous_release_id = running
            row.assigned_at = now
            row.stage_index = rollout.stage_index
            if running != rollout.release_id:
                devices.set_assignment(session, device=device, component=component,
                                       release_id=rollout.release_id)
            events.record(session, kind="assigned", device_id=device.id,
                          release_id=rollout.release_id, rollout_id=rollout.id,
                          message=f"rollout {rollout.id} stage {stage.name}")
    if not rows:
        session.commit()
        return Action.WAIT
    session.flush()
    known = _Known(session, rollout.release_id, rows[:size])
    view = StageView(
        stage=stage, is_last=rollout.stage_index == len(stages) - 1, stage_devices=size,
        soaked_s=(now - rollout.stage_started_at).total_seconds(),
        outcomes=tuple(_outcome(session, row, rollout.release_id, known)
                       for row in rows[:size]))
    decision = decide(view)
    if decision.action is Action.WAIT:
        session.commit()
        return decision.action
    if decision.action is Action.ADVANCE:
        rollout.stage_index += 1
        rollout.stage_started_at = now
        kind = "rollout-stage-advanced"
    elif decision.action is Action.COMPLETE:
        rollout.status = COMPLETED
        kind = "rollout-completed"
    elif decision.action is Action.PAUSE:
        rollout.status = PAUSED
        kind = "rollout-paused"
    else:
        rollout.status = ABORTED
        kind = "rollout-aborted"
        _roll_back_devices(session, rollout, rows, now=now)
    rollout.reason = decision.reason[:500]
    events.record(session, kind=kind, rollout_id=rollout.id, release_id=rollout.release_id,
                  message=decision.reason)
    session.commit()
    log.info("rollout %s: %s (%s)", rollout.id, decision.action, decision.reason)
    return decision.action


def _roll_back_devices(session: Session, rollout: Rollout, rows: list[RolloutDevice], *,
                       now: datetime) -> int:
    count = 0
    component = devices.release_component(session.get(Release, rollout.release_id))
    for row in rows:
        if row.assigned_at is None or row.left_at is not None:
            continue
        device = session.get(Device, row.device_id)
        if rollout.release_id in (
                devices.assigned_release(session, device=device, component=component),
                devices.running_release(session, device=device, component=component)):
            devices.set_assignment(session, device=device, component=component,
                                   release_id=row.previous_release_id)
            count += 1
            events.record(session, kind="rollback-assigned", device_id=device.id,
                          rollout_id=rollout.id, release_id=row.previous_release_id,
                          message=f"rollout {rollout.id} rolled back: back to "
                          f"{row.previous_release_id or 'no release'}")
    return count


def operator_action(session: Session, *, rollout_id: str, action: str, actor: str) -> Rollout:
    rollout = get_rollout(session, rollout_id=rollout_id)
    transitions = {
        "pause": ({ACTIVE}, PAUSED),
        "resume": ({PAUSED}, ACTIVE),
        "abort": ({ACTIVE, PAUSED}, ABORTED),
        "rollback": ({ACTIVE, PAUSED, COMPLETED, ABORTED}, ROLLED_BACK),
    }
    if action not in transitions:
        raise InvalidInput(f"unknown rollout action {action!r}")
    allowed, new_status = transitions[action]
    if rollout.status not in allowed:
        raise Conflict(f"cannot {action} a rollout that is {rollout.status}")
    rows = list(session.scalars(select(RolloutDevice).where(
        RolloutDevice.rollout_id == rollout.id)))
    if action in ("abort", "rollback"):
        _roll_back_devices(session, rollout, rows, now=utcnow())
    if action == "resume":
        rollout.stage_started_at = utcnow()
    rollout.status = new_status
    rollout.reason = f"{action} by {actor}"
    events.record(session, kind=f"rollout-{new_status}" if action != "resume"
                  else "rollout-resumed", rollout_id=rollout.id, release_id=rollout.release_id,
                  message=f"{action} by {actor}")
    session.commit()
    return rollout


def tick_all(session: Session) -> None:
    for rollout in session.scalars(select(Rollout).where(Rollout.status == ACTIVE)).all():
        try:
            tick(session, rollout)
        except Exception:
            session.rollback()
            log.exception("rollout %s: tick failed", rollout.id)
