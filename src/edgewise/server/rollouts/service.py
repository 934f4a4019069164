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
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, and_, case, cast, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from .._db import utcnow
from .._errors import Conflict, InvalidInput, NotFound
from ..devices import service as devices
from ..devices.models import Device, InstallResult
from ..events import service as events
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


@dataclass
class _Member:
    """A device's place in a rollout as the tick reads it: plain columns, no ORM object (a
    tick over 10,000 devices reads all of them)."""

    device_id: str
    assigned_at: datetime | None = None
    previous_release_id: str | None = None
    left_at: datetime | None = None  # out of the rollout (its component removed)


def _sync_members(session: Session, rollout: Rollout) -> list[_Member]:
    """Rollout devices in stable order; devices that joined the group since are appended."""
    rows = [_Member(*r) for r in session.execute(
        select(RolloutDevice.device_id, RolloutDevice.assigned_at,
               RolloutDevice.previous_release_id, RolloutDevice.left_at)
        .where(RolloutDevice.rollout_id == rollout.id).order_by(RolloutDevice.position))]
    known = {r.device_id for r in rows}
    group = get_group(session, name=rollout.group_name)
    new = sorted((d for d in member_ids(session, group=group) if d not in known),
                 key=lambda d: _order_key(rollout.id, d))
    if new:
        session.execute(insert(RolloutDevice), [
            dict(rollout_id=rollout.id, device_id=device_id, position=len(rows) + i)
            for i, device_id in enumerate(new)])
        rows.extend(_Member(device_id) for device_id in new)
    return rows


def _assign(session: Session, rollout: Rollout, stage: Stage, members: list[_Member], *,
            now: datetime) -> None:
    """Assign the rollout's release to the stage's devices not assigned yet, in bulk: their
    rollout rows remember what each ran before, devices that already run it keep their
    assignment, and each gets an "assigned" event."""
    if not members:
        return
    component = devices.release_component(session.get(Release, rollout.release_id))
    ids = [m.device_id for m in members]
    running = devices.running_releases(session, device_ids=ids, component=component)
    for m in members:
        m.previous_release_id, m.assigned_at = running.get(m.device_id), now
    session.execute(update(RolloutDevice), [
        dict(rollout_id=rollout.id, device_id=m.device_id,
             previous_release_id=m.previous_release_id, assigned_at=now,
             stage_index=rollout.stage_index) for m in members])
    devices.set_assignments(session, device_ids=[
        m.device_id for m in members if m.previous_release_id != rollout.release_id],
        component=component, release_id=rollout.release_id)
    events.record_many(session, [dict(
        kind="assigned", device_id=m.device_id, release_id=rollout.release_id,
        rollout_id=rollout.id, message=f"rollout {rollout.id} stage {stage.name}")
        for m in members], now=now)


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
            _sync_members(session, rollout)
        row = session.get(RolloutDevice, (rollout.id, device_id))
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

    def __init__(self, session: Session, release_id: str, rows: list[_Member]) -> None:
        releases = {release_id} | {r.previous_release_id for r in rows if r.previous_release_id}
        # Plain rows with the three health figures read in SQL: a tick over 10,000 devices
        # reads 20,000 results, and decoding each one's health document cost most of it.
        self.results = {(r.device_id, r.release_id): r for r in session.execute(
            select(InstallResult.device_id, InstallResult.release_id, InstallResult.outcome,
                   InstallResult.finished_at,
                   InstallResult.health["top1_agreement"].as_float().label("top1_agreement"),
                   InstallResult.health["p95_latency_ms"].as_float().label("p95_latency_ms"),
                   InstallResult.health["memory_mb"].as_float().label("memory_mb"))
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


def _outcome(row: _Member | RolloutDevice, release_id: str, known: _Known) -> DeviceOutcome:
    if row.assigned_at is not None and row.previous_release_id == release_id:
        return DeviceOutcome(device_id=row.device_id, outcome="committed")  # already ran it
    result = known.results.get((row.device_id, release_id))
    if result is None or row.assigned_at is None or result.finished_at < row.assigned_at \
            or result.outcome == "retrying":
        return DeviceOutcome(device_id=row.device_id, outcome=None)
    previous = (known.results.get((row.device_id, row.previous_release_id))
                if row.previous_release_id else None)
    flags, rating = known.flags_rating(row.device_id)
    inputs, anomalous = known.drift.get(row.device_id, (0, 0))
    return DeviceOutcome(
        device_id=row.device_id, outcome=result.outcome,
        golden_agreement=result.top1_agreement,
        p95_latency_ms=result.p95_latency_ms, memory_mb=result.memory_mb,
        previous_p95_latency_ms=previous.p95_latency_ms if previous is not None else None,
        previous_memory_mb=previous.memory_mb if previous is not None else None,
        flags=flags, rating=rating, inputs=inputs, anomalous=anomalous)


def members_of(rollout: Rollout):
    """The SQL condition for the rollout's devices, but those that left it (`leave`)."""
    return and_(RolloutDevice.rollout_id == rollout.id, RolloutDevice.left_at.is_(None))


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
            .where(members_of(rollout))
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
    fields = ("sent_bytes", "full_bytes", "delta_files", "delta_fallbacks", "reused_files")
    # Summed in SQL: a rollout of 10,000 devices has 10,000 download events, and the rollout
    # page (and the fleet simulator watching it) asks for these totals every few seconds.
    row = session.execute(select(func.count(), *(
        func.coalesce(func.sum(cast(Event.detail[("download", name)].as_string(),
                                    BigInteger)), 0) for name in fields))
        .where(Event.kind == "downloaded", Event.release_id == rollout.release_id,
               Event.device_id.in_(device_ids))).one()
    totals = {"downloads": int(row[0]), "bytes_sent": int(row[1]), "bytes_full": int(row[2]),
              "delta_files": int(row[3]), "delta_fallbacks": int(row[4]),
              "reused_files": int(row[5])}
    if adapter is not None and adapter["full_model_bytes"] is not None:
        totals["full_model_bytes"] = totals["downloads"] * adapter["full_model_bytes"]
    return totals


# The inputs of each rollout's last "wait" in this process, and when it was decided: a tick
# whose inputs did not change since decides the same (`decide` is a pure function of them),
# so it does not read every member's result again. A report, feedback, drift figures, a new
# member, an assignment, the soak time passing or another replica's decision changes the key;
# what a key could miss (an update that keeps every count and the newest time) is read again
# at least every RECHECK_AFTER.
_WAITING: dict[tuple[str, str], tuple[tuple[Any, ...], datetime]] = {}
RECHECK_AFTER = timedelta(seconds=10)


def _inputs_key(session: Session, rollout: Rollout, stage_rows: list[_Member],
                soaked: bool) -> tuple[Any, ...]:
    releases = sorted({rollout.release_id} | {
        r.previous_release_id for r in stage_rows if r.previous_release_id})
    results = tuple(session.execute(
        select(InstallResult.release_id, InstallResult.outcome, func.count(),
               func.max(InstallResult.finished_at))
        .where(InstallResult.release_id.in_(releases))
        .group_by(InstallResult.release_id, InstallResult.outcome)
        .order_by(InstallResult.release_id, InstallResult.outcome)).tuples())
    feedback = tuple(session.execute(
        select(func.count(), func.max(Feedback.id))
        .where(Feedback.release_id == rollout.release_id)).one())
    drift = tuple(session.execute(
        select(func.count(), func.sum(DriftReport.inputs), func.sum(DriftReport.anomalous))
        .where(DriftReport.release_id == rollout.release_id)).one())
    assigned = sum(1 for r in stage_rows if r.assigned_at is not None)
    return (rollout.stage_index, rollout.stage_started_at, len(stage_rows), assigned, soaked,
            tuple(releases), results, feedback, drift)


def tick(session: Session, rollout: Rollout, *, now: datetime | None = None) -> Action | None:
    """One decision step for an active rollout; returns what was done."""
    if rollout.status != ACTIVE:
        return None
    now = now or utcnow()
    stages = [stage_from_json(s) for s in rollout.stages]
    stage = stages[rollout.stage_index]
    rows = [r for r in _sync_members(session, rollout) if r.left_at is None]
    size = stage_size(stage, len(rows))
    _assign(session, rollout, stage, [r for r in rows[:size] if r.assigned_at is None], now=now)
    if not rows:
        session.commit()
        return Action.WAIT
    soaked_s = (now - rollout.stage_started_at).total_seconds()
    key = _inputs_key(session, rollout, rows[:size], soaked_s >= stage.min_soak_s)
    cache_key = (str(session.get_bind().engine.url), rollout.id)
    waited = _WAITING.get(cache_key)
    if waited is not None and waited[0] == key and now - waited[1] < RECHECK_AFTER:
        session.commit()
        return Action.WAIT  # nothing the decision reads changed since it said "wait"
    known = _Known(session, rollout.release_id, rows[:size])
    view = StageView(
        stage=stage, is_last=rollout.stage_index == len(stages) - 1, stage_devices=size,
        soaked_s=soaked_s,
        outcomes=tuple(_outcome(row, rollout.release_id, known)
                       for row in rows[:size]))
    decision = decide(view)
    if decision.action is Action.WAIT:
        session.commit()
        _WAITING[cache_key] = (key, now)
        return decision.action
    _WAITING.pop(cache_key, None)
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
