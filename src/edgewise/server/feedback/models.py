from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String
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


class DriftReport(Base):
    """A device's input-drift aggregates for the release it runs (replaced on every report):
    how many inputs its detector scored and how many looked anomalous, the score histogram.
    Aggregates only: no image, no single score, nothing finer than the hour."""

    __tablename__ = "drift_reports"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"),
                                           primary_key=True)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"), primary_key=True,
                                            index=True)
    inputs: Mapped[int] = mapped_column(Integer)
    anomalous: Mapped[int] = mapped_column(Integer)
    expected_share: Mapped[float | None] = mapped_column(Float, nullable=True)
    histogram_edges: Mapped[list[float]] = mapped_column(JSON, default=list)
    histogram: Mapped[list[int]] = mapped_column(JSON, default=list)
    per_hour: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
