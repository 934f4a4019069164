"""Device enrollment, assignment and status reports.

A device runs one release per component (`artifacts.component_of`): its model (the columns
on `Device`) and each container app or set of configuration files (`DeviceComponent` rows).
Assigning a release replaces the assignment of its component only; a report updates the
component it names. Unassigning a component (`unassign_component`) tells the device to remove
it and takes the device out of that component's rollouts (`rollouts.service.leave`), so none
assigns it again; its row goes when the device reports it removed.
"""

from __future__ import annotations

import json
import secrets
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, cast, func, insert, select, update
from sqlalchemy.orm import Session

from ...artifacts import MODEL_COMPONENT, component_of
from ...windows import parse_window, zone
from .._auth import hash_token, new_token
from .._db import utcnow
from .._errors import Conflict, InvalidInput, NotFound, Unauthorized
from ..events import service as events
from ..releases.models import Release
from .models import Device, DeviceComponent, EnrollmentToken, InstallResult

FINAL_STATES = {"committed", "rolled-back", "failed"}

AGENT_STATES = {
    "idle", "checking", "downloading", "verifying", "awaiting-window", "installing",
    "activating",
    "health-checking", "committed", "rolling-back", "rolled-back", "failed",
}


def create_enrollment_token(session: Session, *, ttl_s: int) -> tuple[str, datetime]:
    token = new_token()
    expires = utcnow() + timedelta(seconds=ttl_s)
    session.add(EnrollmentToken(token_hash=hash_token(token), expires_at=expires))
    session.commit()
    return token, expires


def enroll(session: Session, *, token: str, public_key: str, name: str, hardware: str,
           tags: list[str] | None = None, timezone: str = "UTC") -> Device:
    """Exchange a single-use token for a device record bound to the key pair the device
    generated (the server never sees the private key)."""
    _check_timezone(timezone)
    if session.scalars(select(Device).where(Device.public_key == public_key)).first():
        raise Conflict("this device key is already enrolled (as another device): enroll from "
                       "a fresh state directory, which makes a new key pair")
    row = session.get(EnrollmentToken, hash_token(token))
    if row is None:
        raise Unauthorized("unknown enrollment token")
    if row.used_at is not None:
        raise Unauthorized("enrollment token was already used")
    if row.expires_at < utcnow():
        raise Unauthorized("enrollment token has expired")
    device = Device(id=f"dev-{secrets.token_hex(5)}", name=name or "device", hardware=hardware,
                    public_key=public_key, state="enrolled", status={},
                    tags=sorted(set(tags or [])), timezone=timezone)
    # Claim the token with a conditional UPDATE so two concurrent enrollments cannot both win.
    claimed = session.execute(
        update(EnrollmentToken)
        .where(EnrollmentToken.token_hash == row.token_hash, EnrollmentToken.used_at.is_(None))
        .values(used_at=utcnow(), device_id=device.id)
    ).rowcount
    if claimed != 1:
        session.rollback()
        raise Unauthorized("enrollment token was already used")
    session.add(device)
    events.record(session, kind="enrolled", device_id=device.id,
                  message=f"{device.name} enrolled ({hardware})")
    session.commit()
    return device


def get_device(session: Session, *, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    return device


def list_devices(session: Session, *, state: str | None = None, release_id: str | None = None,
                 tag: str | None = None, seen_since: datetime | None = None,
                 limit: int | None = None, offset: int = 0) -> list[Device]:
    """Devices in enrollment order, filtered in SQL; `limit`/`offset` page through a fleet
    too large to load at once."""
    query = select(Device).order_by(Device.enrolled_at, Device.id)
    if state is not None:
        query = query.where(Device.state == state)
    if release_id is not None:
        query = query.where(Device.release_id == (None if release_id == "none" else release_id))
    if tag is not None:
        # tags is a JSON list of strings: match the quoted element in its text (portable
        # across SQLite and PostgreSQL; LIKE's wildcards in the tag are escaped).
        quoted = json.dumps(tag).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(cast(Device.tags, String).like(f"%{quoted}%", escape="\\"))
    if seen_since is not None:
        query = query.where(Device.last_seen_at >= seen_since)
    if limit is not None:
        query = query.limit(limit).offset(offset)
    return list(session.scalars(query))


@dataclass(frozen=True)
class FleetCounts:
    total: int
    by_state: dict[str, int]
    by_release: dict[str | None, int]  # release id (None: no release yet) -> devices on it
    # Releases of the other components (apps, config files) -> devices that run them.
    by_component_release: dict[str, int]
    # Each of the other components -> its update state -> devices (the model's is `by_state`).
    by_component_state: dict[str, dict[str, int]]

    def running(self, release_id: str) -> int:
        """Devices that run this release, whatever its component."""
        return self.by_release.get(release_id, 0) + self.by_component_release.get(release_id, 0)


def fleet_counts(session: Session) -> FleetCounts:
    """Counts computed by the database (a fleet page must not load every device)."""
    by_state = dict(session.execute(
        select(Device.state, func.count()).group_by(Device.state)).all())
    by_release = dict(session.execute(
        select(Device.release_id, func.count()).group_by(Device.release_id)).all())
    by_component = dict(session.execute(
        select(DeviceComponent.release_id, func.count())
        .where(DeviceComponent.release_id.is_not(None))
        .group_by(DeviceComponent.release_id)).all())
    by_component_state: dict[str, dict[str, int]] = {}
    for component, state, n in session.execute(
            select(DeviceComponent.component, DeviceComponent.state, func.count())
            .group_by(DeviceComponent.component, DeviceComponent.state)
            .order_by(DeviceComponent.component, DeviceComponent.state)):
        by_component_state.setdefault(component, {})[state] = n
    return FleetCounts(total=sum(by_state.values()), by_state=by_state, by_release=by_release,
                       by_component_release=by_component,
                       by_component_state=by_component_state)


def release_device_counts(session: Session, *, release: Release) -> tuple[int, int]:
    """(devices running, devices assigned) this release, as their model or as the component
    it is."""
    if release_component(release) == MODEL_COMPONENT:
        running, assigned = Device.release_id, Device.assigned_release_id
    else:
        running, assigned = DeviceComponent.release_id, DeviceComponent.assigned_release_id
    return (session.scalar(select(func.count()).where(running == release.id)) or 0,
            session.scalar(select(func.count()).where(assigned == release.id)) or 0)


def release_component(release: Release) -> str:
    """The device component a release is: "model", or the name of an app."""
    return component_of((release.manifest or {}).get("kind", ""), release.name)


def _component_row(session: Session, device: Device, component: str) -> DeviceComponent:
    row = session.get(DeviceComponent, (device.id, component))
    if row is None:
        row = DeviceComponent(device_id=device.id, component=component, state="idle",
                              updated_at=utcnow())
        session.add(row)
    return row


def set_assignment(session: Session, *, device: Device, component: str,
                   release_id: str | None) -> None:
    """Make `release_id` the wanted release of one component of `device` (None: none)."""
    if component == MODEL_COMPONENT:
        device.assigned_release_id = release_id
    else:
        _component_row(session, device, component).assigned_release_id = release_id


def unassign_component(session: Session, *, device_id: str, component: str,
                       actor: str) -> DeviceComponent:
    """Clear the assignment of one component of a device besides its model: the device stops
    and removes it at its next check-in, and its report of that deletes the row. The device
    leaves that component's rollouts (a rollout in progress would assign it again)."""
    from ..rollouts.service import leave

    device = get_device(session, device_id=device_id)
    if component == MODEL_COMPONENT:
        raise InvalidInput("the model component cannot be removed from a device: assign "
                           "another release instead")
    row = session.get(DeviceComponent, (device.id, component))
    if row is None:
        raise NotFound(f"device {device_id} has no component {component!r}")
    previous = row.assigned_release_id
    row.assigned_release_id = None
    row.updated_at = utcnow()
    events.record(session, kind="unassigned", device_id=device.id, release_id=previous,
                  message=f"{component} unassigned by {actor}: the device removes it")
    leave(session, device_id=device.id, component=component, actor=actor)
    session.commit()
    return row


def running_release(session: Session, *, device: Device, component: str) -> str | None:
    """The release the device last reported it runs as `component`."""
    if component == MODEL_COMPONENT:
        return device.release_id
    row = session.get(DeviceComponent, (device.id, component))
    return row.release_id if row is not None else None


def running_releases(session: Session, *, device_ids: list[str], component: str
                     ) -> dict[str, str | None]:
    """`running_release` of many devices at once (a rollout stage of thousands): device id ->
    the release it last reported running as `component` (absent: none)."""
    found: dict[str, str | None] = {}
    for chunk in _chunks(device_ids):
        if component == MODEL_COMPONENT:
            query = select(Device.id, Device.release_id).where(Device.id.in_(chunk))
        else:
            query = select(DeviceComponent.device_id, DeviceComponent.release_id).where(
                DeviceComponent.device_id.in_(chunk), DeviceComponent.component == component)
        found.update((device_id, release) for device_id, release in session.execute(query))
    return found


def set_assignments(session: Session, *, device_ids: list[str], component: str,
                    release_id: str | None) -> None:
    """`set_assignment` of many devices at once, in a few statements (no ORM object each).
    Devices loaded in `session` are expired so that they read the new assignment."""
    now = utcnow()
    for chunk in _chunks(device_ids):
        if component == MODEL_COMPONENT:
            session.execute(update(Device).where(Device.id.in_(chunk))
                            .values(assigned_release_id=release_id)
                            .execution_options(synchronize_session=False))
            continue
        have = set(session.scalars(select(DeviceComponent.device_id).where(
            DeviceComponent.device_id.in_(chunk), DeviceComponent.component == component)))
        if have:
            session.execute(update(DeviceComponent).where(
                DeviceComponent.device_id.in_(have), DeviceComponent.component == component)
                .values(assigned_release_id=release_id)
                .execution_options(synchronize_session=False))
        missing = [d for d in chunk if d not in have]
        if missing:
            session.execute(insert(DeviceComponent), [dict(
                device_id=d, component=component, state="idle", updated_at=now,
                assigned_release_id=release_id) for d in missing])
    for obj in list(session.identity_map.values()):
        if isinstance(obj, (Device, DeviceComponent)):
            session.expire(obj)


def _chunks(items: list[str], size: int = 1000) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def assigned_release(session: Session, *, device: Device, component: str) -> str | None:
    if component == MODEL_COMPONENT:
        return device.assigned_release_id
    row = session.get(DeviceComponent, (device.id, component))
    return row.assigned_release_id if row is not None else None


def components(session: Session, *, device: Device) -> list[DeviceComponent]:
    """The device's components besides its model, by name."""
    return list(session.scalars(select(DeviceComponent).where(
        DeviceComponent.device_id == device.id).order_by(DeviceComponent.component)))


def assign(session: Session, *, release_id: str, device_ids: list[str] | None) -> list[Device]:
    """Make `release_id` the wanted release of its component on the given devices (None:
    every device); their other components keep their assignments."""
    release = session.get(Release, release_id)
    if release is None:
        raise NotFound(f"no release {release_id!r}")
    if device_ids is None:
        devices = list_devices(session)
    else:
        devices = [get_device(session, device_id=d) for d in device_ids]
    component = release_component(release)
    for device in devices:
        set_assignment(session, device=device, component=component, release_id=release.id)
        events.record(session, kind="assigned", device_id=device.id, release_id=release.id,
                      message=f"assigned {release.name}@{release.version}")
    session.commit()
    return devices


LAST_SEEN_RESOLUTION = timedelta(seconds=30)


def assignment(session: Session, *, device: Device) -> Release | None:
    now = utcnow()
    # A check-in is a read; record "last seen" at a coarse resolution so polling fleets do
    # not turn every check-in into a database write.
    if device.last_seen_at is None or now - device.last_seen_at > LAST_SEEN_RESOLUTION:
        device.last_seen_at = now
        session.commit()
    if device.assigned_release_id is None:
        return None
    return session.get(Release, device.assigned_release_id)


def component_assignments(session: Session, *, device: Device) -> list[Release]:
    """The releases assigned to the device's components besides its model, by component."""
    return [release for row in components(session, device=device)
            if row.assigned_release_id is not None
            and (release := session.get(Release, row.assigned_release_id)) is not None]


def report(
    session: Session,
    *,
    device: Device,
    state: str,
    event: str,
    release_id: str | None,
    target_release_id: str | None,
    message: str,
    detail: dict[str, Any],
    delta_versions: list[int] | None = None,
    component: str = MODEL_COMPONENT,
    commit: bool = True,
) -> None:
    """Apply one agent report (`commit=False`: the caller commits, e.g. after a batch)."""
    if state not in AGENT_STATES:
        raise Conflict(f"unknown agent state {state!r}")
    for rid in {release_id, target_release_id} - {None}:
        if not _release_exists(session, rid):
            raise NotFound(f"no release {rid!r}")
    device.last_seen_at = utcnow()
    if component == MODEL_COMPONENT:
        device.state = state
        device.release_id = release_id
        device.status = {**(device.status or {}), "last_event": event, "message": message,
                         "target_release_id": target_release_id}
    else:
        for rid in {release_id, target_release_id} - {None}:
            if release_component(session.get(Release, rid)) != component:
                raise Conflict(f"release {rid} is not a release of component {component!r}")
        if event == "removed":
            # The device no longer runs it: the row goes, unless the component was assigned
            # again meanwhile (then the device installs it again at its next check-in).
            row = session.get(DeviceComponent, (device.id, component))
            if row is not None and row.assigned_release_id is None:
                session.delete(row)
            elif row is not None:
                row.state, row.release_id, row.updated_at = "idle", None, utcnow()
        else:
            row = _component_row(session, device, component)
            row.state, row.release_id, row.updated_at = state, release_id, utcnow()
    if delta_versions is not None:  # kept from the last report that said (older agents never do)
        device.status["delta_versions"] = sorted(set(delta_versions))
    events.record(session, kind=event, device_id=device.id,
                  release_id=target_release_id or release_id, state=state, message=message,
                  detail=detail)
    if state in FINAL_STATES and target_release_id is not None:
        result = session.get(InstallResult, (device.id, target_release_id))
        if result is None:
            result = InstallResult(device_id=device.id, release_id=target_release_id)
            session.add(result)
        # A failure the device will retry (e.g. a dropped download) is not an outcome yet.
        result.outcome = "retrying" if state == "failed" and detail.get("will_retry") else state
        result.finished_at = utcnow()
        if detail.get("health"):
            result.health = detail["health"]
    if commit:
        session.commit()


# Releases are never deleted: once seen, an id is known for good (a report names one or two,
# and loading a release's manifest to check that it exists cost more than the report).
# Per database (tests run several in one process).
_KNOWN_RELEASES: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _release_exists(session: Session, release_id: str) -> bool:
    known = _KNOWN_RELEASES.setdefault(session.get_bind().engine, set())
    if release_id in known:
        return True
    if session.scalar(select(Release.id).where(Release.id == release_id)) is None:
        return False
    if len(known) > 100_000:
        known.clear()
    known.add(release_id)
    return True


def _check_timezone(name: str) -> None:
    try:
        zone(name)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def update_device(session: Session, *, device_id: str, tags: list[str] | None,
                  timezone: str | None, window: dict[str, Any] | None,
                  clear_window: bool) -> Device:
    device = get_device(session, device_id=device_id)
    if tags is not None:
        device.tags = sorted(set(tags))
    if timezone is not None:
        _check_timezone(timezone)
        device.timezone = timezone
    if window is not None:
        try:
            parse_window(window)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        device.window = window
    if clear_window:
        device.window = None
    events.record(session, kind="device-updated", device_id=device.id,
                  message=f"tags={device.tags} tz={device.timezone} window={device.window}")
    session.commit()
    return device


def effective_window(session: Session, *, device: Device) -> dict[str, Any] | None:
    """The device's own window, else the first window of a group it belongs to."""
    if device.window:
        return device.window
    from ..groups.service import groups_of

    for group in groups_of(session, device=device):
        if group.window:
            return group.window
    return None


def rollout_of(session: Session, *, device: Device) -> str | None:
    from ..rollouts.models import Rollout, RolloutDevice

    row = session.execute(
        select(Rollout.id).join(RolloutDevice, RolloutDevice.rollout_id == Rollout.id)
        .where(RolloutDevice.device_id == device.id,
               Rollout.release_id == device.assigned_release_id)
        .order_by(Rollout.created_at.desc())).first()
    return row[0] if row else None


def revoke(session: Session, *, device_id: str, actor: str) -> Device:
    """Cut a device off at once: its key is forgotten, its assignment is dropped."""
    device = get_device(session, device_id=device_id)
    if device.revoked_at is not None:
        raise Conflict(f"device {device_id} is already revoked")
    device.public_key = None  # no signature verifies any more
    device.revoked_at = utcnow()
    device.assigned_release_id = None
    device.state = "revoked"
    events.record(session, kind="revoked", device_id=device.id, message=f"revoked by {actor}")
    session.commit()
    return device
