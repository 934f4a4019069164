"""What the device's users tell the agent: defer an upcoming update, give feedback.

Invariant: users' processes (CLI, local API) never write `state.json`; they write their own
small files atomically (`defer.json`, one file per feedback item in `feedback/`), which the
daemon reads. Feedback never carries an image: a rating, a comment, a flagged label.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from ._errors import AgentConfigError, AgentTransportError
from ._store import AgentRecord, StateDir, atomic_write_json

__all__ = ["defer_update", "deferred_until", "flush_feedback", "submit_feedback"]

log = logging.getLogger("edgewise.agent")


def deferred_until(paths: StateDir, rec: AgentRecord) -> datetime | None:
    try:
        data = json.loads(paths.defer_path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if rec.target is None or data.get("release_id") != rec.target.release_id:
        return None
    try:
        return datetime.fromisoformat(data["until"])
    except (KeyError, ValueError):
        return None


def defer_update(paths: StateDir, *, seconds: int) -> dict[str, Any]:
    """Postpone the pending update, within the policy's `max_defer_s` from when it arrived."""
    rec = paths.load_record()
    if rec.target is None:
        raise AgentConfigError("no update is pending; nothing to defer")
    window = rec.target.window or {}
    max_defer_s = int(window.get("max_defer_s", 0))
    if max_defer_s <= 0:
        raise AgentConfigError("the update policy does not allow deferring this update")
    seen = datetime.fromisoformat(rec.target_seen_at) if rec.target_seen_at else datetime.now(UTC)
    limit = seen + timedelta(seconds=max_defer_s)
    until = min(datetime.now(UTC) + timedelta(seconds=max(0, seconds)), limit)
    atomic_write_json(paths.defer_path, {"release_id": rec.target.release_id,
                                         "until": until.isoformat(timespec="seconds")})
    return {"release": rec.target.label, "deferred_until": until.isoformat(timespec="seconds"),
            "policy_limit": limit.isoformat(timespec="seconds"),
            "capped": until == limit}


def submit_feedback(paths: StateDir, *, rating: int | None, comment: str,
                    predicted: str | None, correct: str | None) -> dict[str, Any]:
    """Spool feedback about the running release; the daemon delivers it."""
    rec = paths.load_record()
    if rec.installed is None:
        raise AgentConfigError("no release is installed; nothing to give feedback on")
    if rating is not None and not 1 <= rating <= 5:
        raise ValueError("rating is 1 to 5")
    if rating is None and not comment and predicted is None:
        raise ValueError("give a rating, a comment, or a wrong prediction")
    if len(comment) > 2000:
        raise ValueError("comment is limited to 2000 characters")
    item = {"release_id": rec.installed.release_id, "rating": rating, "comment": comment,
            "predicted": predicted, "correct": correct}
    paths.feedback_dir.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns()}-{secrets.token_hex(3)}.json"
    atomic_write_json(paths.feedback_dir / name, item)
    return {**item, "release": rec.installed.label}


def flush_feedback(paths: StateDir, client) -> int:
    """Deliver spooled feedback in order; keep what the server could not take yet."""
    if not paths.feedback_dir.is_dir():
        return 0
    sent = 0
    for path in sorted(paths.feedback_dir.glob("*.json")):
        try:
            item = json.loads(path.read_text())
            client.feedback(item)
        except ValueError:
            log.warning("dropping unreadable feedback file %s", path.name)
        except AgentTransportError as exc:
            if exc.status_code is None or exc.status_code >= 500:
                break  # offline: try again later
            log.warning("server refused feedback, dropping it: %s", exc)
        path.unlink(missing_ok=True)
        sent += 1
    return sent
