from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from .._db import Base


class Group(Base):
    """A static group (explicit members) or a dynamic one (devices carrying all its tags)."""

    __tablename__ = "groups"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "static" | "dynamic"
    selector: Mapped[list[str]] = mapped_column(JSON, default=list)  # tags, for dynamic
    window: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class GroupMember(Base):
    __tablename__ = "group_members"

    group_name: Mapped[str] = mapped_column(ForeignKey("groups.name", ondelete="CASCADE"),
                                            primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"),
                                           primary_key=True)


class GroupProfile(Base):
    """What the group's devices can run (edgewise.ml.compress.DeviceProfile's fields) and
    which hardware ids they are: `edgewise fit --group` picks a candidate for it and can
    publish that candidate as the release's variant for this hardware."""

    __tablename__ = "group_profiles"

    group_name: Mapped[str] = mapped_column(ForeignKey("groups.name", ondelete="CASCADE"),
                                            primary_key=True)
    profile: Mapped[dict[str, Any]] = mapped_column(JSON)
    hardware: Mapped[list[str]] = mapped_column(JSON, default=list)
