from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from .._deps import DeviceDep, SessionDep, ViewerDep
from . import service

router = APIRouter(prefix="/api/v1", tags=["feedback"])


class FeedbackIn(BaseModel):
    release_id: str
    rating: int | None = Field(default=None, ge=1, le=5)
    comment: str = Field(default="", max_length=2000)
    predicted: str | None = Field(default=None, max_length=128,
                                  description="flag a wrong prediction: what the model said")
    correct: str | None = Field(default=None, max_length=128, description="what it should be")


@router.post("/device/feedback", status_code=204, tags=["device API"])
def submit(body: FeedbackIn, device: DeviceDep, session: SessionDep) -> None:
    service.submit(session, device=device, release_id=body.release_id, rating=body.rating,
                   comment=body.comment, predicted=body.predicted, correct=body.correct)


@router.get("/releases/{release_id}/feedback", dependencies=[ViewerDep])
def release_feedback(release_id: str, session: SessionDep) -> dict[str, Any]:
    return service.summary(session, release_id=release_id)


class DriftIn(BaseModel):
    """The agent's drift aggregates (`edgewise.agent.DriftLog.summary`)."""

    model_config = ConfigDict(allow_inf_nan=False)

    release_id: str = Field(max_length=32)
    inputs: int = Field(ge=0, le=2**53)
    anomalous: int = Field(ge=0, le=2**53)
    expected_share: float | None = Field(default=None, ge=0, le=1)
    histogram_edges: list[float] = Field(default_factory=list, max_length=256)
    histogram: list[int] = Field(default_factory=list, max_length=257)
    per_hour: dict[str, dict[str, float]] = Field(default_factory=dict, max_length=48)


@router.post("/device/drift", status_code=204, tags=["device API"])
def report_drift(body: DriftIn, device: DeviceDep, session: SessionDep) -> None:
    service.report_drift(session, device=device, **body.model_dump())


@router.get("/releases/{release_id}/drift", dependencies=[ViewerDep])
def release_drift(release_id: str, session: SessionDep) -> dict[str, Any]:
    """Pooled input-drift aggregates of the devices running a release."""
    return service.drift_summary(session, release_id=release_id)
