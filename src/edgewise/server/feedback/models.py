from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from .._db import Base, utcnow


class Feedback(Base):
    """What a device's users said about a release: a rating, a comment, a wrong prediction.
    Never the image itself: that stays on the device."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"),
                                           index=True)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"), index=True)
    ts: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)
    comment: Mapped[str] = mapped_column(String(2000), default="")
    predicted: Mapped[str | None] = mapped_column(String(128), nullable=True)
    correct: Mapped[str | None] = mapped_column(String(128), nullable=True)
