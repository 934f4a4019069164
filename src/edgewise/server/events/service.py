from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
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


def record_many(session: Session, events: list[dict[str, Any]], *, now: datetime) -> None:
    """`record` of many events at once (one INSERT), e.g. a rollout stage's assignments;
    each dict holds `record`'s keyword arguments."""
    if events:
        session.execute(insert(Event), [dict(
            ts=now, kind=e["kind"], device_id=e.get("device_id"),
            release_id=e.get("release_id"), rollout_id=e.get("rollout_id"),
            state=e.get("state"), message=e.get("message", "")[:2000],
            detail=e.get("detail") or {}) for e in events])


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
