from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from .._deps import AdminDep, DeviceDep, SessionDep
from . import service
from .models import Device

router = APIRouter(prefix="/api/v1", tags=["devices"])


class EnrollmentTokenIn(BaseModel):
    ttl_s: int = Field(default=3600, ge=60, le=30 * 24 * 3600)


class EnrollmentTokenOut(BaseModel):
    token: str
    expires_at: datetime


class EnrollIn(BaseModel):
    token: str = Field(min_length=8, max_length=200)
    name: str = Field(default="device", max_length=128)
    hardware: str = Field(default="generic", max_length=128)


class EnrollOut(BaseModel):
    device_id: str
    credential: str


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

    @classmethod
    def of(cls, d: Device) -> DeviceOut:
        return cls(id=d.id, name=d.name, hardware=d.hardware, state=d.state,
                   release_id=d.release_id, assigned_release_id=d.assigned_release_id,
                   enrolled_at=d.enrolled_at, last_seen_at=d.last_seen_at, status=d.status or {})


class AssignIn(BaseModel):
    release_id: str
    device_ids: list[str] | None = Field(default=None, description="null assigns every device")


class AssignmentOut(BaseModel):
    release_id: str | None
    name: str | None = None
    version: str | None = None
    manifest_target: str | None = None


class ReportIn(BaseModel):
    state: str = Field(max_length=32)
    event: str = Field(max_length=32)
    release_id: str | None = Field(default=None, description="release the device runs now")
    target_release_id: str | None = Field(default=None, description="release being installed")
    message: str = Field(default="", max_length=2000)
    detail: dict[str, Any] = Field(default_factory=dict)


@router.post("/enrollment-tokens", response_model=EnrollmentTokenOut, dependencies=[AdminDep],
             status_code=201)
def create_enrollment_token(body: EnrollmentTokenIn, session: SessionDep) -> EnrollmentTokenOut:
    token, expires = service.create_enrollment_token(session, ttl_s=body.ttl_s)
    return EnrollmentTokenOut(token=token, expires_at=expires)


@router.post("/devices/enroll", response_model=EnrollOut, status_code=201)
def enroll(body: EnrollIn, session: SessionDep) -> EnrollOut:
    device, credential = service.enroll(session, token=body.token, name=body.name,
                                        hardware=body.hardware)
    return EnrollOut(device_id=device.id, credential=credential)


@router.get("/devices", response_model=list[DeviceOut], dependencies=[AdminDep])
def list_devices(session: SessionDep) -> list[DeviceOut]:
    return [DeviceOut.of(d) for d in service.list_devices(session)]


@router.get("/devices/{device_id}", response_model=DeviceOut, dependencies=[AdminDep])
def get_device(device_id: str, session: SessionDep) -> DeviceOut:
    return DeviceOut.of(service.get_device(session, device_id=device_id))


@router.post("/assignments", response_model=list[DeviceOut], dependencies=[AdminDep])
def assign(body: AssignIn, session: SessionDep) -> list[DeviceOut]:
    devices = service.assign(session, release_id=body.release_id, device_ids=body.device_ids)
    return [DeviceOut.of(d) for d in devices]


@router.get("/device/assignment", response_model=AssignmentOut, tags=["device API"])
def my_assignment(device: DeviceDep, session: SessionDep) -> AssignmentOut:
    release = service.assignment(session, device=device)
    if release is None:
        return AssignmentOut(release_id=None)
    return AssignmentOut(release_id=release.id, name=release.name, version=release.version,
                         manifest_target=release.manifest_target)


@router.post("/device/reports", status_code=204, tags=["device API"])
def report(body: ReportIn, device: DeviceDep, session: SessionDep) -> None:
    service.report(session, device=device, state=body.state, event=body.event,
                   release_id=body.release_id, target_release_id=body.target_release_id,
                   message=body.message, detail=body.detail)
