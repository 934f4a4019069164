"""The device check-in (`GET /api/v1/device/assignment`): the fleet's hottest request, on plain
SQL.

Every device asks this at every poll, so it does only what the answer needs: one statement
reads the device with its assignment (the release, the variant for its hardware, the rollout
that assigned it), the signature is checked against the key that statement read, and one
transaction writes what must be written (the nonce on a shared database; "last seen" at a
30 s resolution). No ORM objects, no session.

Invariant: the answer and the security checks are those of the general path
(`_deps.require_device`, `service.assignment`, `releases.build_for`, `service.effective_window`,
`service.rollout_of`): a request whose signature does not verify, that is stale or replayed,
or that comes from an unknown or revoked device is refused with the same messages; the test
suite runs both on the same fleet and compares (tests/test_checkin.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import (
    Connection,
    Engine,
    String,
    and_,
    bindparam,
    cast,
    exists,
    insert,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from ...trust._device_auth import (
    MAX_SKEW_S,
    DeviceAuthError,
    ReplayedRequest,
    SignedRequest,
    parse_device_auth,
    verify_request,
)
from .._db import utcnow
from ..groups.models import Group, GroupMember
from ..releases.models import Release, ReleaseVariant
from ..rollouts.models import Rollout, RolloutDevice
from .models import Device, DeviceComponent, DeviceNonce
from .service import LAST_SEEN_RESOLUTION

__all__ = ["Checkin", "check_in"]

_rollout = (
    select(Rollout.id)
    .join(RolloutDevice, RolloutDevice.rollout_id == Rollout.id)
    .where(RolloutDevice.device_id == Device.id, Rollout.release_id == Release.id)
    .order_by(Rollout.created_at.desc())
    .limit(1)
    .correlate(Device, Release)
    .scalar_subquery()
)

# Whether a group window could apply at all: most fleets have none, and then the check-in
# does not ask the groups. (A JSON column may hold SQL NULL or the JSON text null.)
_any_group_window = exists().where(Group.window.is_not(None),
                                   cast(Group.window, String) != "null").label("group_windows")

# Whether the device has components besides its model (most fleets: none, and then the
# check-in does not ask for them).
_has_components = exists().where(DeviceComponent.device_id == Device.id,
                                 DeviceComponent.assigned_release_id.is_not(None)
                                 ).correlate(Device).label("has_components")

_POLL = (
    select(Device.public_key, Device.revoked_at, Device.hardware, Device.timezone,
           Device.window, Device.tags, Device.last_seen_at,
           Release.id, Release.name, Release.version, Release.manifest_target,
           ReleaseVariant.version, ReleaseVariant.manifest_target, _rollout,
           _any_group_window, _has_components)
    .select_from(Device)
    .outerjoin(Release, Release.id == Device.assigned_release_id)
    .outerjoin(ReleaseVariant, and_(ReleaseVariant.release_id == Release.id,
                                    ReleaseVariant.hardware == Device.hardware))
    .where(Device.id == bindparam("device_id"))
)

_component_rollout = (
    select(Rollout.id)
    .join(RolloutDevice, RolloutDevice.rollout_id == Rollout.id)
    .where(RolloutDevice.device_id == DeviceComponent.device_id,
           Rollout.release_id == Release.id)
    .order_by(Rollout.created_at.desc())
    .limit(1)
    .correlate(DeviceComponent, Release)
    .scalar_subquery()
)

_COMPONENTS = (
    select(DeviceComponent.component, Release.id, Release.name, Release.version,
           Release.manifest_target, ReleaseVariant.version, ReleaseVariant.manifest_target,
           _component_rollout)
    .select_from(DeviceComponent)
    .join(Release, Release.id == DeviceComponent.assigned_release_id)
    .outerjoin(ReleaseVariant, and_(ReleaseVariant.release_id == Release.id,
                                    ReleaseVariant.hardware == bindparam("hardware")))
    .where(DeviceComponent.device_id == bindparam("device_id"))
    .order_by(DeviceComponent.component)
)

_SEEN = (update(Device).where(Device.id == bindparam("device_id"))
         .values(last_seen_at=bindparam("now")))
_NONCE = insert(DeviceNonce).values(device_id=bindparam("device_id"), nonce=bindparam("nonce"),
                                    expires_at=bindparam("expires_at"))
# PostgreSQL: the nonce and "last seen" in one statement (a data-modifying CTE), atomically.
_NONCE_AND_SEEN = _SEEN.add_cte(_NONCE.cte("nonce"))


@lru_cache(maxsize=65_536)
def _public_key(hex_key: str) -> Ed25519PublicKey:
    """Parsed once per device key (a check-in's signature check is then only the verify)."""
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))


_GROUP_WINDOWS = (
    select(Group.kind, Group.selector, Group.window, GroupMember.device_id)
    .outerjoin(GroupMember, and_(GroupMember.group_name == Group.name,
                                 GroupMember.device_id == bindparam("device_id")))
    .order_by(Group.name)
)


@dataclass(frozen=True)
class Checkin:
    """The answer, as `routes.AssignmentOut` serialises it."""

    device_id: str
    body: dict[str, Any]

    def json(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()


def check_in(engine: Engine, *, authorization: str, target: str, shared_nonces: bool,
             replay_guard: Any = None, now: datetime | None = None) -> Checkin:
    """Authenticate a signed check-in and answer it. `shared_nonces`: the replay guard is
    the database's `device_nonces` table (replicas); else `replay_guard` (one process).
    Raises DeviceAuthError for any request that is not a device's own, fresh one."""
    signed = parse_device_auth(authorization)
    try:
        return _check_in(engine, signed, target, shared_nonces, replay_guard, now)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        # The database restarted under a pooled connection: the pool is reset; try once more.
        return _check_in(engine, signed, target, shared_nonces, replay_guard, now)


def _check_in(engine: Engine, signed: SignedRequest, target: str, shared_nonces: bool,
              replay_guard: Any, now: datetime | None) -> Checkin:
    now = now or utcnow()
    # Autocommit: each statement is its own transaction, so a check-in is two round trips
    # (read, then one write statement), with no BEGIN/COMMIT around them.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        row = conn.execute(_POLL, {"device_id": signed.device_id}).first()
        touch = authenticate(signed, row, target, now)
        if shared_nonces:
            try:
                conn.execute(_NONCE_AND_SEEN if touch else _NONCE,
                             {"device_id": signed.device_id, "nonce": signed.nonce,
                              "expires_at": float(signed.ts + MAX_SKEW_S), "now": now})
            except IntegrityError:
                raise ReplayedRequest() from None
        else:
            replay_guard.check(signed)
            if touch:
                conn.execute(_SEEN, {"device_id": signed.device_id, "now": now})
        return Checkin(signed.device_id, _answer(conn, signed.device_id, row))


def _answer(conn: Connection, device_id: str, row: Any) -> dict[str, Any]:
    window = None
    if needs_group_window(row):
        window = first_group_window(conn.execute(_GROUP_WINDOWS, {"device_id": device_id}),
                                    row[TAGS] or [])
    components = (conn.execute(_COMPONENTS, {"device_id": device_id, "hardware": row[HARDWARE]})
                  if row[HAS_COMPONENTS] else ())
    return answer_body(row, window, components)


def authenticate(signed: SignedRequest, row: Any, target: str, now: datetime) -> bool:
    """Refuse a check-in that is not this enrolled device's own (DeviceAuthError); else
    whether "last seen" is due: a check-in is a read, and "last seen" is kept at a coarse
    resolution so that polling fleets do not turn every check-in into a write of the row."""
    if row is None or row[REVOKED_AT] is not None or not row[PUBLIC_KEY]:
        raise DeviceAuthError("unknown device (not enrolled, or revoked)")
    verify_request(signed, row[PUBLIC_KEY], "GET", target, b"", public=_public_key)
    return row[LAST_SEEN] is None or now - row[LAST_SEEN] > LAST_SEEN_RESOLUTION


# Columns of a `_POLL` row, by position (SQLAlchemy rows and asyncpg records both index).
PUBLIC_KEY, REVOKED_AT, HARDWARE, TIMEZONE, WINDOW, TAGS, LAST_SEEN = range(7)
RELEASE_ID, NAME, VERSION, TARGET, VARIANT_VERSION, VARIANT_TARGET, ROLLOUT_ID = range(7, 14)
GROUP_WINDOWS, HAS_COMPONENTS = 14, 15


def needs_group_window(row: Any) -> bool:
    """Whether the answer needs the groups' windows: an assignment (the model's or a
    component's), no window of the device's own, and some group that has one."""
    return ((row[RELEASE_ID] is not None or bool(row[HAS_COMPONENTS])) and not row[WINDOW]
            and bool(row[GROUP_WINDOWS]))


def answer_body(row: Any, group_window: dict[str, Any] | None,
                components: Any = ()) -> dict[str, Any]:
    """The answer from a `_POLL` row, the group window if one applies and, for a device with
    components besides its model, the rows of `_COMPONENTS`."""
    timezone = row[TIMEZONE] or "UTC"
    window = row[WINDOW] or group_window
    if row[RELEASE_ID] is None:
        answer = {"release_id": None, "name": None, "version": None, "manifest_target": None,
                  "window": None, "timezone": timezone, "rollout_id": None}
    else:
        variant = row[VARIANT_VERSION] is not None and bool(row[HARDWARE])
        answer = {"release_id": row[RELEASE_ID], "name": row[NAME],
                  "version": row[VARIANT_VERSION] if variant else row[VERSION],
                  "manifest_target": row[VARIANT_TARGET] if variant else row[TARGET],
                  "window": window, "timezone": timezone, "rollout_id": row[ROLLOUT_ID]}
    if row[HAS_COMPONENTS]:
        # Only then: the answer of a model-only device stays what older agents read.
        answer["components"] = [
            {"component": c[0], "release_id": c[1], "name": c[2],
             "version": c[5] if c[5] is not None and row[HARDWARE] else c[3],
             "manifest_target": c[6] if c[5] is not None and row[HARDWARE] else c[4],
             "window": window, "timezone": timezone, "rollout_id": c[7]}
            for c in components]
    return answer


def first_group_window(groups: Any, tags: list[str]) -> dict[str, Any] | None:
    """The first window (by group name) of a group the device belongs to: a static group
    that lists it, or a dynamic group whose selector tags it carries. `groups`: the rows of
    `_GROUP_WINDOWS`."""
    have = set(tags)
    for kind, selector, window, member in groups:
        if not window:
            continue
        if (kind == "static" and member is not None) or \
                (kind == "dynamic" and set(selector or []) <= have):
            return window
    return None
