from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from .._db import Base, utcnow


class Event(Base):
    """Append-only log of everything that happened to a device or a release."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    device_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    release_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    rollout_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    message: Mapped[str] = mapped_column(String(2000), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
