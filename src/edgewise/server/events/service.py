from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Event


def record(
    session: Session,
    *,
    kind: str,
    device_id: str | None = None,
    release_id: str | None = None,
    rollout_id: str | None = None,
    state: str | None = None,
    message: str = "",
    detail: dict[str, Any] | None = None,
) -> Event:
    event = Event(kind=kind, device_id=device_id, release_id=release_id, rollout_id=rollout_id,
                  state=state,
                  message=message[:2000], detail=detail or {})
    session.add(event)
    return event


def list_events(
    session: Session, *, device_id: str | None = None, release_id: str | None = None,
    rollout_id: str | None = None, limit: int = 500,
) -> list[Event]:
    query = select(Event)
    if rollout_id:
        query = query.where(Event.rollout_id == rollout_id)
    if device_id:
        query = query.where(Event.device_id == device_id)
    if release_id:
        query = query.where(Event.release_id == release_id)
    rows = session.scalars(query.order_by(Event.id.desc()).limit(limit)).all()
    return list(reversed(rows))
