"""FastAPI dependencies shared by every domain: the DB session, the repository, and auth.

Operators authenticate with bearer API tokens that carry a role; devices sign every request
with the key pair they generated at enrollment. `require_role(...)` guards every operator route.

Nothing here blocks the event loop: the only `async` dependencies wait (for a database slot,
for the request body) or read app state, and never touch the database, files or keys;
everything that does is a plain `def`, which FastAPI runs in its thread pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from ..trust import ServerRepository
from ..trust._device_auth import (
    DeviceAuthError,
    ReplayGuard,
    parse_device_auth,
    verify_request,
)
from ..trust._director import DirectorRepository
from ._auth import ROLES, check_admin_token, hash_token
from ._errors import Forbidden, Unauthorized
from ._gate import DbGate
from .devices.models import Device
from .tokens.models import ApiToken

__all__ = [
    "AdminDep",
    "as_device",
    "BodyDep",
    "ContextDep",
    "DeviceDep",
    "Operator",
    "RepoDep",
    "ServerContext",
    "SessionDep",
    "require_role",
    "signed_target",
]


T = TypeVar("T")


@dataclass
class ServerContext:
    sessions: sessionmaker[Session]
    repo: ServerRepository
    director: DirectorRepository
    admin_token_hash: str
    max_upload_bytes: int
    db_gate: DbGate
    # In memory for one process (SQLite); `devices.replay.DatabaseReplayGuard` when replicas
    # share a PostgreSQL database.
    replay_guard: Any = field(default_factory=ReplayGuard)
    # Devices download targets from the object store (presigned redirects), not from us.
    redirect_downloads: bool = False

    @property
    def engine(self) -> Engine:
        return self.sessions.kw["bind"]


@dataclass(frozen=True)
class Operator:
    name: str
    role: str


def _context(request: Request) -> ServerContext:
    return request.app.state.ctx


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for this request once it holds one of the server's database slots (`_gate`);
    closed, and the slot freed, as soon as the endpoint's answer is ready."""
    ctx = _context(request)
    async with ctx.db_gate.slot():
        session = ctx.sessions()
        try:
            yield session
        finally:
            await run_in_threadpool(session.close)  # returns the connection (a rollback)


async def request_body(request: Request) -> bytes:
    """The raw body, read without blocking (Starlette caches it for later readers)."""
    return await request.body()


# Plain attribute reads: `async`, so FastAPI calls them on the event loop instead of
# handing each to its thread pool (a thread switch per dependency per request).
async def get_repo(request: Request) -> ServerRepository:
    return _context(request).repo


async def get_context(request: Request) -> ServerContext:
    return _context(request)


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    cookie = request.cookies.get("edgewise_token")  # the dashboard's session
    if cookie:
        return cookie
    raise Unauthorized("missing bearer token (Authorization: Bearer ...)")


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
BodyDep = Annotated[bytes, Depends(request_body)]


def current_operator(request: Request, session: SessionDep) -> Operator:
    token = bearer_token(request)
    if check_admin_token(token, _context(request).admin_token_hash):
        operator = Operator(name="admin", role="admin")
    else:
        row = session.scalars(select(ApiToken).where(ApiToken.token_hash == hash_token(token),
                                                     ApiToken.revoked.is_(False))).one_or_none()
        if row is None:
            raise Unauthorized("invalid API token")
        operator = Operator(name=row.name, role=row.role)
    request.state.actor = f"operator:{operator.name}({operator.role})"  # for the audit log
    return operator


def require_role(*roles: str) -> Any:
    """Allow the given roles (admin is always allowed)."""
    unknown = set(roles) - ROLES
    if unknown:
        raise ValueError(f"unknown roles {unknown}")

    def check(operator: Annotated[Operator, Depends(current_operator)]) -> Operator:
        if operator.role != "admin" and operator.role not in roles:
            raise Forbidden(f"role {operator.role!r} may not do this (needs one of: "
                            f"{', '.join(('admin', *roles))})")
        return operator

    return Depends(check)


def signed_target(request: Request) -> str:
    """The request target a device signs: the path as sent, then `?query` if any."""
    target = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    if query:
        target += b"?" + query
    return target.decode("latin-1")


def authenticate_device(request: Request, body: bytes, session: Session) -> Device:
    """The device whose key signed this request (`trust._device_auth`), else 401."""
    ctx = _context(request)
    try:
        signed = parse_device_auth(request.headers.get("authorization", ""))
        device = session.get(Device, signed.device_id)
        if device is None or device.revoked_at is not None or not device.public_key:
            raise DeviceAuthError("unknown device (not enrolled, or revoked)")
        verify_request(signed, device.public_key, request.method, signed_target(request), body)
        ctx.replay_guard.check(signed, session=session)
    except DeviceAuthError as exc:
        raise Unauthorized.device(exc) from exc
    request.state.actor = f"device:{device.id}"
    return device


def require_device(request: Request, body: BodyDep, session: SessionDep) -> Device:
    return authenticate_device(request, body, session)


async def as_device(request: Request, work: Callable[[Session, Device], T]) -> T:
    """`work(session, device)` for the device that signed this request, in ONE hand-off to
    the thread pool: authentication, the work and closing the session. The device API's
    busiest requests (director metadata, reports) use it instead of `DeviceDep` +
    `SessionDep` + a `def` endpoint, which cost three thread switches per request."""
    ctx = _context(request)
    body = await request.body()
    async with ctx.db_gate.slot():
        return await run_in_threadpool(_device_work, ctx, request, body, work)


def _device_work(ctx: ServerContext, request: Request, body: bytes,
                 work: Callable[[Session, Device], T]) -> T:
    session = ctx.sessions()
    try:
        return work(session, authenticate_device(request, body, session))
    finally:
        session.close()


RepoDep = Annotated[ServerRepository, Depends(get_repo)]
ContextDep = Annotated[ServerContext, Depends(get_context)]
AdminDep = require_role()
ViewerDep = require_role("viewer", "operator", "publisher")
OperatorDep = require_role("operator")
PublisherDep = require_role("publisher")
DeviceDep = Annotated[Device, Depends(require_device)]
