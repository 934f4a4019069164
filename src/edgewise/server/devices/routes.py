from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field, field_validator
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ...trust._device_auth import DeviceAuthError
from .._deps import (
    ContextDep,
    Operator,
    OperatorDep,
    SessionDep,
    ViewerDep,
    as_device,
    signed_target,
)
from .._errors import Unauthorized
from . import checkin, service
from .models import Device
from .replay import DatabaseReplayGuard

router = APIRouter(prefix="/api/v1", tags=["devices"])


class EnrollmentTokenIn(BaseModel):
    ttl_s: int = Field(default=3600, ge=60, le=30 * 24 * 3600)


class EnrollmentTokenOut(BaseModel):
    token: str
    expires_at: datetime


class EnrollIn(BaseModel):
    token: str = Field(min_length=8, max_length=200)
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$", description="the Ed25519 public key "
                            "the device generated (32 bytes, hex); requests are signed with it")
    name: str = Field(default="device", max_length=128)
    hardware: str = Field(default="generic", max_length=128)
    tags: list[str] = Field(default_factory=list, max_length=64)
    timezone: str = Field(default="UTC", max_length=64)


class EnrollOut(BaseModel):
    device_id: str
    director_root: dict[str, Any] = Field(description="root metadata of this server's director "
                                          "repository (the device's second TUF updater)")


class DeviceOut(BaseModel):
    id: str
    name: str
    hardware: str
    state: str
    release_id: str | None
    assigned_release_id: str | None
    enrolled_at: datetime
    last_seen_at: datetime | None
    status: dict[str, Any]
    tags: list[str]
    timezone: str
    window: dict[str, Any] | None

    @classmethod
    def of(cls, d: Device) -> DeviceOut:
        return cls(id=d.id, name=d.name, hardware=d.hardware, state=d.state,
                   release_id=d.release_id, assigned_release_id=d.assigned_release_id,
                   enrolled_at=d.enrolled_at, last_seen_at=d.last_seen_at,
                   status=d.status or {}, tags=d.tags or [], timezone=d.timezone or "UTC",
                   window=d.window)


class AssignIn(BaseModel):
    release_id: str
    device_ids: list[str] | None = Field(default=None, description="null assigns every device")


class ComponentAssignmentOut(BaseModel):
    component: str
    release_id: str
    name: str
    version: str
    manifest_target: str
    window: dict[str, Any] | None = None
    timezone: str = "UTC"
    rollout_id: str | None = None


class AssignmentOut(BaseModel):
    """The model component's assignment (the fields every agent reads) and, only when the
    device has any, the assignments of its other components (container apps)."""

    release_id: str | None
    name: str | None = None
    version: str | None = None
    manifest_target: str | None = None
    window: dict[str, Any] | None = Field(default=None, description="maintenance window; "
                                          "install only inside it (device-local time)")
    timezone: str = "UTC"
    rollout_id: str | None = None
    components: list[ComponentAssignmentOut] | None = None


class DeviceComponentOut(BaseModel):
    component: str
    assigned_release_id: str | None
    release_id: str | None
    state: str


class ReportIn(BaseModel):
    state: str = Field(max_length=32)
    event: str = Field(max_length=32)
    release_id: str | None = Field(default=None, description="release the device runs now")
    target_release_id: str | None = Field(default=None, description="release being installed")
    message: str = Field(default="", max_length=2000)
    detail: dict[str, Any] = Field(default_factory=dict)
    component: str = Field(default="model", pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
                           description="the component this report is about (older agents: "
                           "the model)")
    delta_versions: list[int] | None = Field(
        default=None,
        description="delta patch format versions the agent reads (agents that send none are "
                    "sent version 1 patches); values that are not whole numbers 1-1000 are "
                    "ignored, and at most 16 are kept")

    @field_validator("delta_versions", mode="before")
    @classmethod
    def _usable_versions(cls, value: Any) -> list[int] | None:
        # Advisory only: junk here must never cost the report it rides on (agents drop
        # reports the server refuses), so it is filtered, not refused.
        if not isinstance(value, list):
            return None
        return [v for v in value if type(v) is int and 1 <= v <= 1000][:16]


@router.post("/enrollment-tokens", response_model=EnrollmentTokenOut,
             dependencies=[OperatorDep],
             status_code=201)
def create_enrollment_token(body: EnrollmentTokenIn, session: SessionDep) -> EnrollmentTokenOut:
    token, expires = service.create_enrollment_token(session, ttl_s=body.ttl_s)
    return EnrollmentTokenOut(token=token, expires_at=expires)


@router.post("/devices/enroll", response_model=EnrollOut, status_code=201)
def enroll(body: EnrollIn, session: SessionDep, ctx: ContextDep) -> EnrollOut:
    device = service.enroll(session, token=body.token, public_key=body.public_key,
                            name=body.name, hardware=body.hardware, tags=body.tags,
                            timezone=body.timezone)
    return EnrollOut(device_id=device.id, director_root=json.loads(ctx.director.root))


@router.get("/devices", response_model=list[DeviceOut], dependencies=[ViewerDep])
def list_devices(
    session: SessionDep,
    state: Annotated[str | None, Query(max_length=32)] = None,
    release_id: Annotated[str | None, Query(max_length=32, description="'none': devices "
                                            "without a release")] = None,
    tag: Annotated[str | None, Query(max_length=128)] = None,
    seen_since: Annotated[datetime | None, Query(description="last seen at or after (UTC)")]
    = None,
    limit: Annotated[int | None, Query(ge=1, le=10_000, description="page size (default: "
                                       "every device)")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[DeviceOut]:
    """Devices in enrollment order, filtered; page with `limit` and `offset`."""
    return [DeviceOut.of(d) for d in service.list_devices(
        session, state=state, release_id=release_id, tag=tag, seen_since=seen_since,
        limit=limit, offset=offset)]


@router.get("/devices-summary", dependencies=[ViewerDep])
def fleet_summary(session: SessionDep) -> dict[str, Any]:
    """Fleet counts by state and by model release (`by_release`), by release of the other
    components (`by_component_release`: apps, config files) and by state of each of them
    (`by_component_state`: component -> state -> devices), computed by the database."""
    counts = service.fleet_counts(session)
    return {"total": counts.total, "by_state": counts.by_state,
            "by_release": {k or "none": v for k, v in counts.by_release.items()},
            "by_component_release": counts.by_component_release,
            "by_component_state": counts.by_component_state}


@router.get("/devices/{device_id}", response_model=DeviceOut, dependencies=[ViewerDep])
def get_device(device_id: str, session: SessionDep) -> DeviceOut:
    return DeviceOut.of(service.get_device(session, device_id=device_id))


@router.get("/devices/{device_id}/components", response_model=list[DeviceComponentOut],
            dependencies=[ViewerDep])
def device_components(device_id: str, session: SessionDep) -> list[DeviceComponentOut]:
    """The device's components besides its model: assigned and reported release, state."""
    device = service.get_device(session, device_id=device_id)
    return [DeviceComponentOut(component=c.component, assigned_release_id=c.assigned_release_id,
                               release_id=c.release_id, state=c.state)
            for c in service.components(session, device=device)]


@router.delete("/devices/{device_id}/components/{component}",
               response_model=DeviceComponentOut)
def unassign_component(device_id: str, component: str, session: SessionDep,
                       operator: Annotated[Operator, OperatorDep]) -> DeviceComponentOut:
    """Remove a component (an app, configuration files) from a device: its assignment is
    cleared now; the device stops and deletes it at its next check-in and reports it, and
    the component's row disappears then."""
    row = service.unassign_component(session, device_id=device_id, component=component,
                                     actor=operator.name)
    return DeviceComponentOut(component=row.component, assigned_release_id=None,
                              release_id=row.release_id, state=row.state)


@router.post("/assignments", response_model=list[DeviceOut], dependencies=[OperatorDep])
def assign(body: AssignIn, session: SessionDep) -> list[DeviceOut]:
    devices = service.assign(session, release_id=body.release_id, device_ids=body.device_ids)
    return [DeviceOut.of(d) for d in devices]


class DevicePatch(BaseModel):
    tags: list[str] | None = Field(default=None, max_length=64)
    timezone: str | None = Field(default=None, max_length=64)
    window: dict[str, Any] | None = None
    clear_window: bool = False


@router.patch("/devices/{device_id}", response_model=DeviceOut, dependencies=[OperatorDep])
def update_device(device_id: str, body: DevicePatch, session: SessionDep) -> DeviceOut:
    device = service.update_device(session, device_id=device_id, tags=body.tags,
                                   timezone=body.timezone, window=body.window,
                                   clear_window=body.clear_window)
    return DeviceOut.of(device)


@router.get("/device/assignment", response_model=AssignmentOut, tags=["device API"])
async def my_assignment(request: Request) -> Response:
    """What this device should run. The fleet's hottest request: answered on plain SQL
    (`checkin`), with the same signature, freshness and replay checks as every device call."""
    ctx = request.app.state.ctx
    async with ctx.db_gate.slot():
        try:
            answer = await run_in_threadpool(
                checkin.check_in, ctx.engine,
                authorization=request.headers.get("authorization", ""),
                target=signed_target(request),
                shared_nonces=isinstance(ctx.replay_guard, DatabaseReplayGuard),
                replay_guard=ctx.replay_guard)
        except DeviceAuthError as exc:
            raise Unauthorized.device(exc) from exc
    request.state.actor = f"device:{answer.device_id}"
    return Response(answer.json(), media_type="application/json")


MAX_REPORT_BATCH = 100


@router.post("/device/reports", status_code=204, tags=["device API"])
async def report(body: ReportIn | Annotated[list[ReportIn], Field(
        min_length=1, max_length=MAX_REPORT_BATCH)], request: Request) -> None:
    """One report, or several in the order the device made them (its outbox): applied in
    one transaction, all or none (a refused batch changes nothing; the agent then sends its
    reports one at a time, so one bad report cannot hold back the others)."""
    items = body if isinstance(body, list) else [body]

    def apply(session: Session, device: Device) -> None:
        for item in items:
            service.report(session, device=device, state=item.state, event=item.event,
                           release_id=item.release_id,
                           target_release_id=item.target_release_id, message=item.message,
                           detail=item.detail, delta_versions=item.delta_versions,
                           component=item.component, commit=False)
        session.commit()

    await as_device(request, apply)
    for item in items:
        request.app.state.metrics.reports.labels(event=item.event).inc()


@router.post("/devices/{device_id}/revoke", response_model=DeviceOut)
def revoke(device_id: str, session: SessionDep,
           operator: Annotated[Operator, OperatorDep]) -> DeviceOut:
    return DeviceOut.of(service.revoke(session, device_id=device_id, actor=operator.name))
