from __future__ import annotations

import statistics
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .._db import utcnow
from .._errors import InvalidInput, NotFound
from ..devices.models import Device
from ..events import service as events
from ..releases.models import Release
from .models import DriftReport, Feedback


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


def report_drift(session: Session, *, device: Device, release_id: str, inputs: int,
                 anomalous: int, expected_share: float | None, histogram_edges: list[float],
                 histogram: list[int], per_hour: dict[str, Any]) -> DriftReport:
    """Replace the device's drift aggregates for the release it runs."""
    if release_id != device.release_id:
        raise InvalidInput(f"drift is reported for the release the device runs "
                           f"({device.release_id}), not {release_id}")
    if anomalous > inputs:
        raise InvalidInput("more anomalous inputs than inputs")
    if histogram and len(histogram) != len(histogram_edges) + 1:
        raise InvalidInput("a histogram has one bin more than it has edges")
    row = session.get(DriftReport, (device.id, release_id))
    if row is None:
        row = DriftReport(device_id=device.id, release_id=release_id)
        session.add(row)
    row.inputs, row.anomalous, row.expected_share = inputs, anomalous, expected_share
    row.histogram_edges, row.histogram, row.per_hour = histogram_edges, histogram, per_hour
    row.updated_at = utcnow()
    session.commit()
    return row


def drift_summary(session: Session, *, release_id: str) -> dict[str, Any]:
    """The fleet's drift for a release: pooled share of anomalous inputs, summed histogram."""
    rows = session.scalars(select(DriftReport).where(DriftReport.release_id == release_id)
                           .order_by(DriftReport.device_id)).all()
    inputs = sum(r.inputs for r in rows)
    anomalous = sum(r.anomalous for r in rows)
    edges = rows[0].histogram_edges if rows else []
    hist = [0] * (len(edges) + 1) if edges else []
    for r in rows:
        if r.histogram_edges == edges and len(r.histogram) == len(hist):
            hist = [a + b for a, b in zip(hist, r.histogram, strict=True)]
    expected = [r.expected_share for r in rows if r.expected_share is not None]
    return {
        "release_id": release_id, "devices": len(rows), "inputs": inputs,
        "anomalous": anomalous,
        "share_anomalous": round(anomalous / inputs, 4) if inputs else None,
        "expected_share": expected[0] if expected else None,
        "histogram_edges": edges, "histogram": hist,
        "per_device": [{"device_id": r.device_id, "inputs": r.inputs,
                        "share_anomalous": round(r.anomalous / r.inputs, 4) if r.inputs else None,
                        "updated_at": r.updated_at.isoformat()} for r in rows],
    }
