from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from .._db import Base, utcnow


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    device_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    hardware: Mapped[str] = mapped_column(String(128), default="generic")
    # The Ed25519 public key the device generated at enrollment (hex); None once revoked.
    public_key: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    enrolled_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    state: Mapped[str] = mapped_column(String(32), default="enrolled")
    # What the device reports it runs, and what the operator wants it to run.
    release_id: Mapped[str | None] = mapped_column(ForeignKey("releases.id"), nullable=True)
    assigned_release_id: Mapped[str | None] = mapped_column(ForeignKey("releases.id"),
                                                            nullable=True)
    status: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    # A maintenance window for this device alone (overrides its groups' windows).
    window: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class DeviceComponent(Base):
    """A device's component other than its model (a container app, by name): the release
    the operator wants there and what the device reports it runs there. The model component
    keeps its columns on `Device` (assigned_release_id, release_id, state), so fleets of
    model-only devices read and write exactly what they did before components."""

    __tablename__ = "device_components"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"),
                                           primary_key=True)
    component: Mapped[str] = mapped_column(String(64), primary_key=True)
    assigned_release_id: Mapped[str | None] = mapped_column(ForeignKey("releases.id"),
                                                            nullable=True)
    release_id: Mapped[str | None] = mapped_column(ForeignKey("releases.id"), nullable=True)
    state: Mapped[str] = mapped_column(String(32), default="idle")
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class InstallResult(Base):
    """How a device's attempt at a release ended, with the model health it measured."""

    __tablename__ = "install_results"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(32))
    health: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    finished_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class DeviceNonce(Base):
    """A device request's nonce, kept until its signature's time window has passed: the
    replay guard that every server process sharing the database sees (`devices.replay`)."""

    __tablename__ = "device_nonces"

    device_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float, index=True)  # unix seconds
