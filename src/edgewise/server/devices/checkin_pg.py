"""The device check-in on PostgreSQL, answered on the event loop with asyncpg.

`checkin` answers the poll in two statements, but on the way it crosses FastAPI's routing, a
thread hop and SQLAlchemy's execution layer, which cost more CPU than the statements. On
PostgreSQL, `CheckinFastPath` (an ASGI middleware, first in line) takes `GET
/api/v1/device/assignment` itself: the same statements (compiled once from `checkin`'s), run
as prepared statements on an asyncpg pool, and the same checks (`checkin.authenticate`), the
same replay guard (the `device_nonces` row) and the same answer (`checkin.answer_body`). Every
other request goes on to the app. SQLite keeps `checkin.check_in` (one process, no asyncpg).

Errors answer as the app would: 401 for a refused device (a replayed nonce says so in
`REPLAY_HEADER`), 503 with Retry-After when no connection frees up within the queue timeout
or the database is unreachable (a connection lost mid-way is retried once on another).
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import make_url
from starlette.types import ASGIApp, Receive, Scope, Send

from ...trust._device_auth import (
    MAX_SKEW_S,
    REPLAY_HEADER,
    DeviceAuthError,
    ReplayedRequest,
    SignedRequest,
    parse_device_auth,
)
from .._db import utcnow
from . import checkin

__all__ = ["CHECKIN_PATH", "AsyncCheckin", "CheckinFastPath"]

log = logging.getLogger("edgewise.server")

CHECKIN_PATH = "/api/v1/device/assignment"
# A connection that broke (asyncpg reports some breaks as an internal state error), or a
# database shutting down or starting up (class 57 errors).
_CONNECTION_LOST = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                    asyncpg.InternalClientError, asyncpg.exceptions.OperatorInterventionError,
                    OSError)


class _Statement:
    """A `checkin` statement as PostgreSQL text with $n parameters, and how to fill them:
    by name from the request's values, or with the constants compiled into it."""

    def __init__(self, statement: Any) -> None:
        compiled = statement.compile(dialect=asyncpg_dialect())
        self.sql = compiled.string
        self._names = tuple(compiled.positiontup)
        self._constants = {k: v for k, v in compiled.params.items() if v is not None}

    def args(self, values: dict[str, Any]) -> list[Any]:
        return [values[n] if n in values else self._constants[n] for n in self._names]


class AsyncCheckin:
    """The check-in's asyncpg pool and prepared statements, for one process's event loop.

    The pool opens on the first check-in (on the loop that serves requests) and closes
    with the app (`close`)."""

    def __init__(self, db_url: str, *, pool_size: int, queue_timeout_s: float,
                 retry_after_s: int) -> None:
        url = make_url(db_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._pool_size = pool_size
        self._queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._poll = _Statement(checkin._POLL)
        self._nonce = _Statement(checkin._NONCE)
        self._nonce_and_seen = _Statement(checkin._NONCE_AND_SEEN)
        self._groups = _Statement(checkin._GROUP_WINDOWS)
        self._components = _Statement(checkin._COMPONENTS)

    async def _open(self) -> asyncpg.Pool:
        async with self._opening:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._dsn, min_size=1, max_size=self._pool_size, init=_json_codecs,
                    timeout=self._queue_timeout_s)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def check_in(self, *, authorization: str, target: str,
                       now: datetime | None = None) -> checkin.Checkin:
        """Authenticate a signed check-in and answer it (`checkin.check_in`'s contract).
        Raises DeviceAuthError, TimeoutError (no connection free) or a connection error."""
        signed = parse_device_auth(authorization)
        pool = self._pool or await self._open()
        try:
            return await self._check_in(pool, signed, target, now or utcnow())
        except _CONNECTION_LOST:
            # The database restarted under a pooled connection: that one is dropped.
            return await self._check_in(pool, signed, target, now or utcnow())

    async def _check_in(self, pool: asyncpg.Pool, signed: SignedRequest, target: str,
                        now: datetime) -> checkin.Checkin:
        values = {"device_id": signed.device_id, "nonce": signed.nonce,
                  "expires_at": float(signed.ts + MAX_SKEW_S), "now": now}
        async with pool.acquire(timeout=self._queue_timeout_s) as conn:
            try:
                return await self._answer(conn, signed, target, now, values)
            except _CONNECTION_LOST:
                conn.terminate()  # never handed out again
                raise

    async def _answer(self, conn: asyncpg.Connection, signed: SignedRequest, target: str,
                      now: datetime, values: dict[str, Any]) -> checkin.Checkin:
        row = await conn.fetchrow(self._poll.sql, *self._poll.args(values))
        touch = checkin.authenticate(signed, row, target, now)
        write = self._nonce_and_seen if touch else self._nonce
        try:
            await conn.execute(write.sql, *write.args(values))
        except asyncpg.UniqueViolationError:
            raise ReplayedRequest() from None
        window = None
        if checkin.needs_group_window(row):
            groups = await conn.fetch(self._groups.sql, *self._groups.args(values))
            window = checkin.first_group_window(groups, row[checkin.TAGS] or [])
        components = ()
        if row[checkin.HAS_COMPONENTS]:
            components = await conn.fetch(self._components.sql, *self._components.args(
                {**values, "hardware": row[checkin.HARDWARE]}))
        return checkin.Checkin(signed.device_id,
                               checkin.answer_body(row, window, components))


async def _json_codecs(conn: asyncpg.Connection) -> None:
    # SQLAlchemy's JSON columns are `json` on PostgreSQL; asyncpg hands them over as text.
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=json.dumps, decoder=json.loads,
                                  schema="pg_catalog")


class CheckinFastPath:
    """ASGI middleware: `GET CHECKIN_PATH` answered by `AsyncCheckin`, the rest by `app`."""

    def __init__(self, app: ASGIApp, *, checkin: AsyncCheckin) -> None:
        self.app = app
        self.checkin = checkin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "GET"
                or scope["path"] != CHECKIN_PATH):
            await self.app(scope, receive, send)
            return
        authorization = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        headers: list[tuple[bytes, bytes]] = []
        try:
            answer = await self.checkin.check_in(authorization=authorization,
                                                 target=target.decode("latin-1"))
        except DeviceAuthError as exc:
            status, body = 401, {"detail": str(exc)}
            if isinstance(exc, ReplayedRequest):
                headers.append((REPLAY_HEADER.lower().encode(), b"replayed"))
        except TimeoutError:
            status, body = 503, {"detail": "the server is busy (no database connection free); "
                                           "retry later"}
            headers.append((b"retry-after", str(self.checkin.retry_after_s).encode()))
        except _CONNECTION_LOST as exc:
            log.warning("database unavailable: %s", str(exc).splitlines()[0][:200]
                        if str(exc) else type(exc).__name__)
            status, body = 503, {"detail": "the database is unavailable; retry later"}
            headers.append((b"retry-after", str(self.checkin.retry_after_s).encode()))
        else:
            await _respond(send, 200, answer.json(), headers)
            return
        await _respond(send, status, json.dumps(body).encode(), headers)


async def _respond(send: Send, status: int, body: bytes,
                   headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
