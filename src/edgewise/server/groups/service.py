"""Groups: static (explicit members) and dynamic (every device carrying all selector tags)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import cast, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from ...windows import parse_window
from .._errors import Conflict, InvalidInput, NotFound
from ..devices.models import Device
from .models import Group, GroupMember, GroupProfile


def create_group(session: Session, *, name: str, kind: str, selector: list[str],
                 members: list[str], window: dict[str, Any] | None) -> Group:
    if kind not in ("static", "dynamic"):
        raise InvalidInput("group kind is 'static' or 'dynamic'")
    if kind == "dynamic" and not selector:
        raise InvalidInput("a dynamic group needs at least one selector tag")
    if kind == "static" and selector:
        raise InvalidInput("a static group has members, not selector tags")
    if session.get(Group, name) is not None:
        raise Conflict(f"group {name!r} already exists")
    if window is not None:
        parse_window(window)
    group = Group(name=name, kind=kind, selector=selector, window=window)
    session.add(group)
    session.flush()
    for device_id in members:
        if session.get(Device, device_id) is None:
            raise NotFound(f"no device {device_id!r}")
        session.add(GroupMember(group_name=name, device_id=device_id))
    session.commit()
    return group


def get_group(session: Session, *, name: str) -> Group:
    group = session.get(Group, name)
    if group is None:
        raise NotFound(f"no group {name!r}")
    return group


def list_groups(session: Session) -> list[Group]:
    return list(session.scalars(select(Group).order_by(Group.name)))


def add_members(session: Session, *, name: str, device_ids: list[str]) -> None:
    group = get_group(session, name=name)
    if group.kind != "static":
        raise InvalidInput("members are added to static groups; dynamic groups follow tags")
    for device_id in device_ids:
        if session.get(Device, device_id) is None:
            raise NotFound(f"no device {device_id!r}")
        if session.get(GroupMember, (name, device_id)) is None:
            session.add(GroupMember(group_name=name, device_id=device_id))
    session.commit()


def member_ids(session: Session, *, group: Group) -> list[str]:
    """The group's device ids, read as plain columns (a rollout tick asks this every time)."""
    if group.kind == "static":
        return list(session.scalars(select(GroupMember.device_id).where(
            GroupMember.group_name == group.name).order_by(GroupMember.device_id)))
    if session.get_bind().dialect.name == "postgresql":
        # Containment in SQL: PostgreSQL sends only the matching ids, no tag lists to decode.
        return list(session.scalars(select(Device.id).where(
            cast(Device.tags, JSONB).contains(list(group.selector))).order_by(Device.id)))
    wanted = set(group.selector)
    return [device_id for device_id, tags in session.execute(
        select(Device.id, Device.tags).order_by(Device.id)) if wanted <= set(tags or [])]


def is_member(session: Session, *, group: Group, device: Device) -> bool:
    """Membership of one device, without listing the group (a check-in asks this)."""
    if group.kind == "static":
        return session.get(GroupMember, (group.name, device.id)) is not None
    return set(group.selector) <= set(device.tags or [])


def groups_of(session: Session, *, device: Device) -> list[Group]:
    return [g for g in list_groups(session) if is_member(session, group=g, device=device)]


def set_profile(session: Session, *, name: str, profile: dict[str, Any],
                hardware: list[str]) -> GroupProfile:
    get_group(session, name=name)
    row = session.get(GroupProfile, name)
    if row is None:
        row = GroupProfile(group_name=name, profile=profile, hardware=hardware)
        session.add(row)
    else:
        row.profile, row.hardware = profile, hardware
    session.commit()
    return row


def get_profile(session: Session, *, name: str) -> GroupProfile | None:
    get_group(session, name=name)
    return session.get(GroupProfile, name)
