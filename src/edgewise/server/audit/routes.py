from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware

from .._deps import AdminDep, SessionDep
from . import service

router = APIRouter(prefix="/api/v1", tags=["audit"])

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


@router.get("/audit", dependencies=[AdminDep])
def audit_log(session: SessionDep, after_id: int = Query(default=0, ge=0, le=2**63 - 1),
              limit: int = Query(default=1000, ge=1, le=10_000)) -> list[dict[str, Any]]:
    return [service.to_json(e) for e in service.list_entries(session, after_id=after_id,
                                                              limit=limit)]


@router.get("/audit/verify", dependencies=[AdminDep])
def verify(session: SessionDep) -> dict[str, Any]:
    """Server-side check of the whole chain (an operator should also verify a copy offline)."""
    prev, after, count = service.GENESIS, 0, 0
    while batch := [service.to_json(e) for e in service.list_entries(session, after_id=after)]:
        ok, bad, reason = service.verify_chain(batch, prev_hash=prev)
        if not ok:
            return {"ok": False, "entries": count, "first_bad_id": bad, "reason": reason}
        prev, after, count = batch[-1]["hash"], batch[-1]["id"], count + len(batch)
    return {"ok": True, "entries": count, "first_bad_id": None, "reason": "ok"}


class AuditMiddleware(BaseHTTPMiddleware):
    """Records every mutating request after it ran, with the identity the auth layer found."""

    async def dispatch(self, request: Request, call_next):
        response = await call_next(request)
        if request.method in MUTATING:
            actor = getattr(request.state, "actor", None) or "anonymous"
            client = request.client.host if request.client else "?"
            sessions = request.app.state.ctx.sessions

            def write() -> None:
                with sessions() as session:
                    service.append(session, actor=actor, method=request.method,
                                   path=request.url.path, status=response.status_code,
                                   client=client)

            await run_in_threadpool(write)
        return response
