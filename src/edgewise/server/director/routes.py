from __future__ import annotations

from fastapi import APIRouter, Response

from .._deps import ContextDep, DeviceDep, SessionDep
from . import service

router = APIRouter(prefix="/api/v1/device/director", tags=["device API"])


@router.get("/{filename}")
def director_metadata(filename: str, device: DeviceDep, session: SessionDep,
                      ctx: ContextDep) -> Response:
    """This device's director metadata (TUF: root, timestamp, snapshot, targets)."""
    body = service.metadata(session, repo=ctx.repo, director=ctx.director, device=device,
                            filename=filename)
    return Response(body, media_type="application/json")
