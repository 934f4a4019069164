from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from .._deps import OperatorDep, SessionDep, ViewerDep
from . import service
from .models import Group, GroupProfile

router = APIRouter(prefix="/api/v1", tags=["groups"])


class GroupIn(BaseModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    kind: str = Field(default="static", description="static | dynamic")
    selector: list[str] = Field(default_factory=list, description="tags (dynamic groups)")
    members: list[str] = Field(default_factory=list, description="device ids (static)")
    window: dict[str, Any] | None = Field(
        default=None, description='{"days": "daily"|["mon",...], "start": "HH:MM", '
        '"duration_min": N, "max_defer_s": S} in each device\'s time zone')


class GroupOut(BaseModel):
    name: str
    kind: str
    selector: list[str]
    window: dict[str, Any] | None
    devices: list[str]


class ProfileIn(BaseModel):
    """A device profile (the fields of `edgewise fit`) and the hardware ids it describes."""

    model_config = ConfigDict(allow_inf_nan=False)

    max_ram_mb: float | None = Field(default=None, gt=0, description="peak RSS budget, MB")
    max_latency_ms: float | None = Field(default=None, gt=0)
    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    threads: int = Field(default=1, ge=1, le=256)
    latency_stat: str = Field(default="p95", pattern="^p(50|95)$")
    slowdown: float = Field(default=1.0, gt=0, description="device latency / reference")
    max_size_mb: float | None = Field(default=None, gt=0)
    hardware: list[str] = Field(default_factory=list, max_length=64,
                                description="hardware ids of the group's devices")


class ProfileOut(ProfileIn):
    group: str


class MembersIn(BaseModel):
    device_ids: list[str]


def _out(session, group: Group) -> GroupOut:
    return GroupOut(name=group.name, kind=group.kind, selector=group.selector or [],
                    window=group.window,
                    devices=service.member_ids(session, group=group))


@router.post("/groups", response_model=GroupOut, status_code=201, dependencies=[OperatorDep])
def create_group(body: GroupIn, session: SessionDep) -> GroupOut:
    from .._errors import InvalidInput

    try:
        group = service.create_group(session, name=body.name, kind=body.kind,
                                     selector=body.selector, members=body.members,
                                     window=body.window)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    return _out(session, group)


@router.get("/groups", response_model=list[GroupOut], dependencies=[ViewerDep])
def list_groups(session: SessionDep) -> list[GroupOut]:
    return [_out(session, g) for g in service.list_groups(session)]


@router.get("/groups/{name}", response_model=GroupOut, dependencies=[ViewerDep])
def get_group(name: str, session: SessionDep) -> GroupOut:
    return _out(session, service.get_group(session, name=name))


@router.post("/groups/{name}/members", response_model=GroupOut, dependencies=[OperatorDep])
def add_members(name: str, body: MembersIn, session: SessionDep) -> GroupOut:
    service.add_members(session, name=name, device_ids=body.device_ids)
    return _out(session, service.get_group(session, name=name))


def _profile_out(row: GroupProfile) -> ProfileOut:
    return ProfileOut(group=row.group_name, hardware=row.hardware or [], **row.profile)


@router.put("/groups/{name}/profile", response_model=ProfileOut, dependencies=[OperatorDep])
def set_profile(name: str, body: ProfileIn, session: SessionDep) -> ProfileOut:
    """Store what the group's devices can run; `edgewise fit --group` reads it."""
    profile = body.model_dump(exclude={"hardware"})
    hardware = sorted({h.strip() for h in body.hardware if h.strip()})
    return _profile_out(service.set_profile(session, name=name, profile=profile,
                                            hardware=hardware))


@router.get("/groups/{name}/profile", response_model=ProfileOut, dependencies=[ViewerDep])
def get_profile(name: str, session: SessionDep) -> ProfileOut:
    from .._errors import NotFound

    row = service.get_profile(session, name=name)
    if row is None:
        raise NotFound(f"group {name!r} has no device profile")
    return _profile_out(row)
