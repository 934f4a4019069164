from __future__ import annotations

from fastapi import APIRouter, Request, Response

from .._deps import ContextDep, as_device
from . import service

router = APIRouter(prefix="/api/v1/device/director", tags=["device API"])


@router.get("/{filename}")
async def director_metadata(filename: str, request: Request, ctx: ContextDep) -> Response:
    """This device's director metadata (TUF: root, timestamp, snapshot, targets)."""
    body = await as_device(request, lambda session, device: service.metadata(
        session, repo=ctx.repo, director=ctx.director, device=device, filename=filename))
    return Response(body, media_type="application/json")
