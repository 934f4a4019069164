"""The audit log: every mutating request (who, what, when, from where), hash-chained.

Invariant: entry n stores `hash = sha256(prev_hash + canonical(entry))` with `prev_hash` the
hash of entry n-1 (the genesis value for the first). Editing, deleting or reordering any
entry breaks every hash after it, which `verify_chain` detects. Appends are serialised by a
lock (one server process; replicas would need a database lock).
"""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .._db import utcnow
from .models import AuditEntry

__all__ = ["GENESIS", "append", "entry_hash", "list_entries", "verify_chain"]

GENESIS = "0" * 64
_lock = threading.Lock()


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def entry_hash(prev_hash: str, *, ts: str, actor: str, method: str, path: str, status: int,
               client: str) -> str:
    body = _canonical({"ts": ts, "actor": actor, "method": method, "path": path,
                       "status": status, "client": client})
    return hashlib.sha256(prev_hash.encode() + body).hexdigest()


def _ts(value: datetime) -> str:
    return value.isoformat(timespec="microseconds")


def append(session: Session, *, actor: str, method: str, path: str, status: int,
           client: str) -> AuditEntry:
    with _lock:
        last = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1)).first()
        prev = last.hash if last else GENESIS
        ts = utcnow()
        entry = AuditEntry(ts=ts, actor=actor[:160], method=method, path=path[:500],
                           status=status, client=client[:64], prev_hash=prev)
        entry.hash = entry_hash(prev, ts=_ts(ts), actor=entry.actor, method=method,
                                path=entry.path, status=status, client=entry.client)
        session.add(entry)
        session.commit()
        return entry


def list_entries(session: Session, *, after_id: int = 0, limit: int = 1000) -> list[AuditEntry]:
    return list(session.scalars(select(AuditEntry).where(AuditEntry.id > after_id)
                                .order_by(AuditEntry.id).limit(limit)))


def verify_chain(entries: list[dict[str, Any]], *, prev_hash: str = GENESIS
                 ) -> tuple[bool, int | None, str]:
    """Check a run of entries (dicts as the API returns them); (ok, first bad id, reason)."""
    for e in entries:
        if e["prev_hash"] != prev_hash:
            return False, e["id"], "prev_hash does not match the previous entry (removed or " \
                                   "reordered entries)"
        expected = entry_hash(prev_hash, ts=e["ts"], actor=e["actor"], method=e["method"],
                              path=e["path"], status=e["status"], client=e["client"])
        if expected != e["hash"]:
            return False, e["id"], "hash does not match the entry's content (edited entry)"
        prev_hash = e["hash"]
    return True, None, "ok"


def to_json(entry: AuditEntry) -> dict[str, Any]:
    return {"id": entry.id, "ts": _ts(entry.ts), "actor": entry.actor, "method": entry.method,
            "path": entry.path, "status": entry.status, "client": entry.client,
            "prev_hash": entry.prev_hash, "hash": entry.hash}
