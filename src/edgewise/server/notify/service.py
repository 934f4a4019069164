"""Notifications: a transactional outbox over the event log.

Invariant: every notification derives from a committed `Event` row. The notifier tails the
event table from a persisted cursor, so nothing is announced that did not happen and nothing
is lost across restarts: operator events go to MQTT and become webhook deliveries (retried
with backoff, HMAC-signed); assignment events wake the device over MQTT.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from .._db import utcnow
from .._errors import InvalidInput, NotFound
from ..events.models import Event
from .models import NotifierCursor, Webhook, WebhookDelivery
from .mqtt import MqttPublisher, device_topic, event_topic

log = logging.getLogger("edgewise.server.notify")

OPERATOR_EVENTS = ("rollout-", "published", "feedback")
WAKE_EVENTS = ("assigned", "rollback-assigned")
MAX_ATTEMPTS = 8
SIGNATURE_HEADER = "X-Edgewise-Signature"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=` HMAC over `timestamp.body`; receivers check it and reject old timestamps."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def create_webhook(session: Session, *, url: str, events: list[str],
                   secret: str | None) -> Webhook:
    if not url.startswith(("https://", "http://")):
        raise InvalidInput("webhook URL must be http(s)://")
    hook = Webhook(id=f"wh-{secrets.token_hex(5)}", url=url, events=events,
                   secret=secret or secrets.token_urlsafe(32))
    session.add(hook)
    session.commit()
    return hook


def list_webhooks(session: Session) -> list[Webhook]:
    return list(session.scalars(select(Webhook).order_by(Webhook.created_at)))


def deliveries(session: Session, *, webhook_id: str) -> list[WebhookDelivery]:
    if session.get(Webhook, webhook_id) is None:
        raise NotFound(f"no webhook {webhook_id!r}")
    return list(session.scalars(select(WebhookDelivery).where(
        WebhookDelivery.webhook_id == webhook_id).order_by(WebhookDelivery.id)))


def _payload(event: Any) -> dict[str, Any]:
    return {"event_id": event.id, "kind": event.kind, "ts": event.ts.isoformat() + "Z",
            "device_id": event.device_id, "release_id": event.release_id,
            "rollout_id": event.rollout_id, "state": event.state, "message": event.message}


def init_cursor(session: Session) -> NotifierCursor:
    """Called before the server takes requests: a new server does not replay old history,
    an existing one continues where it stopped."""
    cursor = session.get(NotifierCursor, "main")
    if cursor is None:
        last = session.scalars(select(Event.id).order_by(Event.id.desc()).limit(1)).first()
        cursor = NotifierCursor(name="main", last_event_id=last or 0)
        session.add(cursor)
        session.commit()
    return cursor


def process_events(session: Session, *, mqtt: MqttPublisher | None, batch: int = 500) -> int:
    cursor = init_cursor(session)
    # The columns a notification carries, not whole events: a fleet's reports write several
    # events per update, each with a detail document nobody here reads.
    rows = session.execute(
        select(Event.id, Event.kind, Event.ts, Event.device_id, Event.release_id,
               Event.rollout_id, Event.state, Event.message)
        .where(Event.id > cursor.last_event_id).order_by(Event.id).limit(batch)).all()
    if not rows:
        return 0
    hooks = list_webhooks(session)
    for event in rows:
        payload = _payload(event)
        if event.kind.startswith(OPERATOR_EVENTS):
            if mqtt is not None:
                mqtt.publish(event_topic(event.kind), payload)
            for hook in hooks:
                if not hook.events or event.kind.startswith(tuple(hook.events)):
                    session.add(WebhookDelivery(webhook_id=hook.id, event_id=event.id,
                                                kind=event.kind, payload=payload))
        elif event.kind in WAKE_EVENTS and event.device_id and mqtt is not None:
            mqtt.publish(device_topic(event.device_id),
                         {"reason": event.kind, "release_id": event.release_id,
                          "ts": payload["ts"]}, retain=True, queue=False)
        cursor.last_event_id = event.id
    session.commit()
    return len(rows)


def deliver_due(session: Session, *, http: httpx.Client, limit: int = 50) -> int:
    now = utcnow()
    due = session.scalars(select(WebhookDelivery).where(
        WebhookDelivery.delivered_at.is_(None), WebhookDelivery.gave_up.is_(False),
        WebhookDelivery.next_attempt_at <= now).order_by(WebhookDelivery.id).limit(limit)).all()
    for delivery in due:
        hook = session.get(Webhook, delivery.webhook_id)
        body = json.dumps(delivery.payload, sort_keys=True).encode()
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Edgewise-Event": delivery.kind,
                   "X-Edgewise-Delivery": str(delivery.id), "X-Edgewise-Timestamp": ts,
                   SIGNATURE_HEADER: sign(hook.secret, ts, body)}
        delivery.attempts += 1
        try:
            r = http.post(hook.url, content=body, headers=headers)
            ok, error = 200 <= r.status_code < 300, f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            ok, error = False, str(exc)[:400]
        if ok:
            delivery.delivered_at = utcnow()
            delivery.last_error = ""
        else:
            delivery.last_error = error
            if delivery.attempts >= MAX_ATTEMPTS:
                delivery.gave_up = True
                log.warning("webhook %s: gave up on delivery %s: %s", hook.id, delivery.id,
                            error)
            else:
                delivery.next_attempt_at = utcnow() + timedelta(
                    seconds=min(2 ** delivery.attempts, 300))
        session.commit()
    return len(due)
