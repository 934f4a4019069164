from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


def _writer(request: Request) -> service.AuditWriter:
    state = request.app.state
    writer = getattr(state, "audit_writer", None)
    if writer is None:  # one per app (a process): its requests' entries are written together
        writer = state.audit_writer = service.AuditWriter(state.ctx.sessions)
    return writer


class AuditMiddleware:
    """Records every mutating request after it ran, with the identity the auth layer found.

    A plain ASGI middleware: reads (device check-ins, metadata) pass straight through, with
    none of the per-request task and stream machinery of Starlette's BaseHTTPMiddleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING:
            await self.app(scope, receive, send)
            return
        status, recorded = 500, False  # 500: the app failed before it answered

        async def record() -> None:
            nonlocal recorded
            recorded = True
            request = Request(scope)
            actor = getattr(request.state, "actor", None) or "anonymous"
            client = request.client.host if request.client else "?"
            writer = _writer(request)
            await run_in_threadpool(writer.append, actor=actor, method=scope["method"],
                                    path=request.url.path, status=status, client=client)

        async def send_recorded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                await record()  # before the answer ends: whoever saw it can read the record
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        finally:
            if not recorded:
                await record()
