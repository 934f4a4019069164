from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field

from .._deps import AdminDep, SessionDep
from . import service

router = APIRouter(prefix="/api/v1", tags=["notifications"])


class WebhookIn(BaseModel):
    url: str = Field(max_length=2000)
    events: list[str] = Field(default_factory=list,
                              description="event kind prefixes, e.g. rollout-; empty = all")
    secret: str | None = Field(default=None, min_length=16, max_length=200)


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    secret: str | None = None  # only shown once, at creation


class DeliveryOut(BaseModel):
    id: int
    kind: str
    attempts: int
    delivered_at: datetime | None
    gave_up: bool
    last_error: str


@router.post("/webhooks", response_model=WebhookOut, status_code=201, dependencies=[AdminDep])
def create_webhook(body: WebhookIn, session: SessionDep) -> WebhookOut:
    hook = service.create_webhook(session, url=body.url, events=body.events, secret=body.secret)
    return WebhookOut(id=hook.id, url=hook.url, events=hook.events, secret=hook.secret)


@router.get("/webhooks", response_model=list[WebhookOut], dependencies=[AdminDep])
def list_webhooks(session: SessionDep) -> list[WebhookOut]:
    return [WebhookOut(id=h.id, url=h.url, events=h.events)
            for h in service.list_webhooks(session)]


@router.get("/webhooks/{webhook_id}/deliveries", response_model=list[DeliveryOut],
            dependencies=[AdminDep])
def list_deliveries(webhook_id: str, session: SessionDep) -> list[DeliveryOut]:
    return [DeliveryOut(id=d.id, kind=d.kind, attempts=d.attempts, delivered_at=d.delivered_at,
                        gave_up=d.gave_up, last_error=d.last_error)
            for d in service.deliveries(session, webhook_id=webhook_id)]
