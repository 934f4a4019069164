"""The replay guard shared by every server process on one database.

Invariant: a device request's nonce is accepted once per signature window, whichever replica
receives it: the nonce's row is inserted in the request's own transaction, and a second insert
of the same (device, nonce) fails on the primary key. Rows past their window are deleted by
`prune`, which the rollout loop runs (once across replicas).

SQLite, the one-process embedded default, keeps the in-memory guard (`trust.ReplayGuard`):
a write per check-in would serialise every poll on SQLite's single writer.
"""

from __future__ import annotations

import time

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ...trust._device_auth import MAX_SKEW_S, ReplayedRequest, SignedRequest
from .models import DeviceNonce

__all__ = ["DatabaseReplayGuard", "prune"]


class DatabaseReplayGuard:
    def check(self, signed: SignedRequest, *, session: Session | None = None) -> None:
        assert session is not None, "the database guard checks inside the request's session"
        session.add(DeviceNonce(device_id=signed.device_id, nonce=signed.nonce,
                                expires_at=float(signed.ts + MAX_SKEW_S)))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            raise ReplayedRequest() from None


def prune(session: Session, *, now: float | None = None) -> int:
    """Forget nonces whose signatures have expired (they would be refused for their age)."""
    cutoff = time.time() if now is None else now
    result = session.execute(delete(DeviceNonce).where(DeviceNonce.expires_at < cutoff))
    session.commit()
    return result.rowcount or 0
