from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from .._db import Base, utcnow


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"))
    group_name: Mapped[str] = mapped_column(ForeignKey("groups.name"))
    stages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # active -> paused <-> active -> completed | aborted; any -> rolled-back
    status: Mapped[str] = mapped_column(String(16), default="active", index=True)
    stage_index: Mapped[int] = mapped_column(Integer, default=0)
    stage_started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    reason: Mapped[str] = mapped_column(String(500), default="")


class RolloutDevice(Base):
    """A device's place in a rollout: its stable position and what it ran before; `left_at`
    once the operator removed the rollout's component from the device (it is out of the
    rollout: never assigned, counted or rolled back by it again)."""

    __tablename__ = "rollout_devices"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"),
                                            primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"),
                                           primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    previous_release_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    assigned_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    stage_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    left_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
