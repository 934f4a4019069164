from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from .._deps import SessionDep, ViewerDep
from . import service

router = APIRouter(prefix="/api/v1", tags=["events"])


class EventOut(BaseModel):
    id: int
    ts: datetime
    device_id: str | None
    release_id: str | None
    rollout_id: str | None
    kind: str
    state: str | None
    message: str
    detail: dict[str, Any]


@router.get("/events", response_model=list[EventOut], dependencies=[ViewerDep])
def list_events(
    session: SessionDep,
    device_id: str | None = None,
    release_id: str | None = None,
    rollout_id: str | None = None,
    limit: int = Query(default=500, ge=1, le=10_000),
) -> list[EventOut]:
    rows = service.list_events(session, device_id=device_id, release_id=release_id,
                              rollout_id=rollout_id, limit=limit)
    return [EventOut(id=e.id, ts=e.ts, device_id=e.device_id, release_id=e.release_id,
                     rollout_id=e.rollout_id,
                     kind=e.kind, state=e.state, message=e.message, detail=e.detail or {})
            for e in rows]
