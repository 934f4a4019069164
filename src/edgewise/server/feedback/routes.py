from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

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
