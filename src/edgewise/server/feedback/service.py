from __future__ import annotations

import statistics
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .._errors import InvalidInput, NotFound
from ..devices.models import Device
from ..events import service as events
from ..releases.models import Release
from .models import Feedback


def submit(session: Session, *, device: Device, release_id: str, rating: int | None,
           comment: str, predicted: str | None, correct: str | None) -> Feedback:
    release = session.get(Release, release_id)
    if release is None:
        raise NotFound(f"no release {release_id!r}")
    if rating is None and not comment and predicted is None:
        raise InvalidInput("feedback needs a rating, a comment or a flagged prediction")
    labels = set(release.manifest.get("labels", []))
    for label in (predicted, correct):
        if label is not None and label not in labels:
            raise InvalidInput(f"{label!r} is not a label of {release.name}@{release.version}")
    item = Feedback(device_id=device.id, release_id=release_id, rating=rating,
                    comment=comment, predicted=predicted, correct=correct)
    session.add(item)
    events.record(session, kind="feedback", device_id=device.id, release_id=release_id,
                  message=(f"rating {rating}" if rating else "")
                  + (f" flagged {predicted} (should be {correct})" if predicted else "")
                  + (f": {comment[:200]}" if comment else ""))
    session.commit()
    return item


def for_device(session: Session, *, device_id: str, release_id: str) -> tuple[int, float | None]:
    """(wrong-prediction flags, mean rating) of one device for one release."""
    rows = session.scalars(select(Feedback).where(Feedback.device_id == device_id,
                                                  Feedback.release_id == release_id)).all()
    ratings = [r.rating for r in rows if r.rating is not None]
    return sum(1 for r in rows if r.predicted is not None), (
        statistics.mean(ratings) if ratings else None)


def summary(session: Session, *, release_id: str) -> dict[str, Any]:
    rows = session.scalars(select(Feedback).where(Feedback.release_id == release_id)
                           .order_by(Feedback.id)).all()
    ratings = [r.rating for r in rows if r.rating is not None]
    confusions: dict[str, int] = {}
    for r in rows:
        if r.predicted is not None:
            key = f"{r.predicted} -> {r.correct or '?'}"
            confusions[key] = confusions.get(key, 0) + 1
    return {
        "release_id": release_id,
        "count": len(rows),
        "ratings": len(ratings),
        "mean_rating": round(statistics.mean(ratings), 2) if ratings else None,
        "flags": sum(confusions.values()),
        "devices": len({r.device_id for r in rows}),
        "confusions": confusions,
        "comments": [{"device_id": r.device_id, "ts": r.ts.isoformat(), "text": r.comment}
                     for r in rows if r.comment][-20:],
    }
