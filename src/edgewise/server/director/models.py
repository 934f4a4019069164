from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Integer, LargeBinary, Text
from sqlalchemy.orm import Mapped, mapped_column

from .._db import Base


class DirectorState(Base):
    """A device's current director metadata (one version of targets, snapshot, timestamp)."""

    __tablename__ = "director_state"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"),
                                           primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    # What was signed (path, sha256, counter, hardware, release), to know when to re-sign.
    instruction: Mapped[str] = mapped_column(Text)
    targets: Mapped[bytes] = mapped_column(LargeBinary)
    snapshot: Mapped[bytes] = mapped_column(LargeBinary)
    timestamp: Mapped[bytes] = mapped_column(LargeBinary)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
