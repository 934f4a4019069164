"""FastAPI dependencies shared by every domain: the DB session, the repository, and auth."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ..trust import ServerRepository
from ._auth import check_admin_token, hash_token
from ._errors import Unauthorized
from .devices.models import Device

__all__ = ["AdminDep", "ContextDep", "DeviceDep", "RepoDep", "ServerContext", "SessionDep"]


@dataclass
class ServerContext:
    sessions: sessionmaker[Session]
    repo: ServerRepository
    admin_token_hash: str
    max_upload_bytes: int


def _context(request: Request) -> ServerContext:
    return request.app.state.ctx


def get_session(request: Request) -> Iterator[Session]:
    with _context(request).sessions() as session:
        yield session


def get_repo(request: Request) -> ServerRepository:
    return _context(request).repo


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing bearer token (Authorization: Bearer ...)")
    return token.strip()


def require_admin(request: Request) -> None:
    if not check_admin_token(_bearer(request), _context(request).admin_token_hash):
        raise Unauthorized("invalid admin token")


SessionDep = Annotated[Session, Depends(get_session)]


def require_device(request: Request, session: SessionDep) -> Device:
    device = session.scalars(
        select(Device).where(Device.credential_hash == hash_token(_bearer(request)))
    ).one_or_none()
    if device is None:
        raise Unauthorized("unknown device credential (not enrolled, or revoked)")
    return device


RepoDep = Annotated[ServerRepository, Depends(get_repo)]
ContextDep = Annotated[ServerContext, Depends(_context)]
AdminDep = Depends(require_admin)
DeviceDep = Annotated[Device, Depends(require_device)]
