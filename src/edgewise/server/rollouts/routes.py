from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from .._deps import Operator, OperatorDep, SessionDep, ViewerDep
from .._errors import InvalidInput
from .._schema import exclusive
from ..releases.routes import AdapterOut
from ..releases.service import llm_models
from . import service
from .engine import Gates, Stage, parse_stages
from .models import Rollout

router = APIRouter(prefix="/api/v1", tags=["rollouts"])


class GatesIn(BaseModel):
    min_reporting: float = Field(default=1.0, ge=0, le=1)
    pause_failure_rate: float = Field(default=0.0, ge=0, le=1)
    abort_failure_rate: float = Field(default=0.2, ge=0, le=1)
    min_golden_agreement: float = Field(default=1.0, ge=0, le=1)
    max_latency_ratio: float | None = Field(default=1.5, gt=0)
    max_memory_ratio: float | None = Field(default=1.5, gt=0)
    latency_slack_ms: float = Field(default=2.0, ge=0)
    memory_slack_mb: float = Field(default=16.0, ge=0)
    max_flag_rate: float | None = Field(default=None, ge=0)
    min_rating: float | None = Field(default=None, ge=1, le=5)
    max_anomalous_share: float | None = Field(
        default=None, ge=0, le=1, description="pause when more of the committed devices' "
        "inputs than this look anomalous to the release's detector (drift)")
    min_drift_inputs: int = Field(default=200, ge=1, le=2**31)


class RolloutIn(BaseModel):
    release_id: str
    group: str
    stages: str = Field(default="canary:1,field-test:20%,broad:100%",
                        description="NAME:COUNT or NAME:PERCENT%, comma-separated")
    min_soak_s: float = Field(default=0, ge=0)
    gates: GatesIn = Field(default_factory=GatesIn)


class RolloutOut(BaseModel):
    id: str
    release_id: str
    group: str
    status: str
    stage_index: int
    stage: str
    stages: list[dict[str, Any]]
    stage_started_at: datetime
    created_at: datetime
    reason: str
    progress: dict[str, int]
    transfer: dict[str, int]
    adapter: AdapterOut | None = Field(
        default=None, description="an LLM adapter release's base and bytes; null otherwise")


def rollout_out(session, r: Rollout, models=None) -> RolloutOut:
    adapter = service.adapter_of(session, r, models)
    return RolloutOut(id=r.id, release_id=r.release_id, group=r.group_name, status=r.status,
                      stage_index=r.stage_index, stage=r.stages[r.stage_index]["name"],
                      stages=r.stages, stage_started_at=r.stage_started_at,
                      created_at=r.created_at, reason=r.reason,
                      progress=service.progress(session, r),
                      transfer=service.transfer(session, r, adapter=adapter),
                      adapter=AdapterOut(**adapter) if adapter else None)


@router.post("/rollouts", response_model=RolloutOut, status_code=201)
def create_rollout(body: RolloutIn, session: SessionDep,
                   operator: Annotated[Operator, OperatorDep]) -> RolloutOut:
    try:
        stages: list[Stage] = parse_stages(body.stages, min_soak_s=body.min_soak_s,
                                           gates=Gates(**body.gates.model_dump()))
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    rollout = service.create_rollout(session, release_id=body.release_id,
                                     group_name=body.group, stages=stages)
    # The first stage starts now, unless another replica is ticking (it will pick it up).
    with exclusive(session.get_bind(), "rollout-tick") as mine:
        if mine:
            service.tick(session, rollout)
    return rollout_out(session, rollout)


@router.get("/rollouts", response_model=list[RolloutOut], dependencies=[ViewerDep])
def list_rollouts(session: SessionDep) -> list[RolloutOut]:
    models = llm_models(session)
    return [rollout_out(session, r, models) for r in service.list_rollouts(session)]


@router.get("/rollouts/{rollout_id}", response_model=RolloutOut, dependencies=[ViewerDep])
def get_rollout(rollout_id: str, session: SessionDep) -> RolloutOut:
    return rollout_out(session, service.get_rollout(session, rollout_id=rollout_id))


@router.post("/rollouts/{rollout_id}/{action}", response_model=RolloutOut)
def rollout_action(rollout_id: str, action: str, session: SessionDep,
                   operator: Annotated[Operator, OperatorDep]) -> RolloutOut:
    rollout = service.operator_action(session, rollout_id=rollout_id, action=action,
                                      actor=operator.name)
    return rollout_out(session, rollout)
