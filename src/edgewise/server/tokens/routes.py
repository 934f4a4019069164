from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from .._auth import ROLES, hash_token, new_token
from .._deps import AdminDep, SessionDep
from .._errors import InvalidInput
from ..events import service as events
from .models import ApiToken

router = APIRouter(prefix="/api/v1", tags=["operators"])


class TokenIn(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    role: str


class TokenOut(BaseModel):
    name: str
    role: str
    token: str


@router.post("/tokens", response_model=TokenOut, status_code=201, dependencies=[AdminDep])
def create_token(body: TokenIn, session: SessionDep) -> TokenOut:
    if body.role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(sorted(ROLES))}")
    token = new_token()
    session.add(ApiToken(token_hash=hash_token(token), name=body.name, role=body.role))
    events.record(session, kind="token-created", message=f"{body.role} token for {body.name}")
    session.commit()
    return TokenOut(name=body.name, role=body.role, token=token)
