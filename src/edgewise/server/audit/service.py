"""The audit log: every mutating request (who, what, when, from where), hash-chained.

Invariant: entry n stores `hash = sha256(prev_hash + canonical(entry))` with `prev_hash` the
hash of entry n-1 (the genesis value for the first). Editing, deleting or reordering any
entry breaks every hash after it, which `verify_chain` detects. Appends are serialised by a
lock in the process and, across replicas, by a PostgreSQL advisory lock held from reading
the last entry to committing the next, so the chain never forks. A process's concurrent
requests are written together (`AuditWriter`: one transaction per batch, each request
answered once its entry is committed), so a fleet's reports do not queue one transaction
at a time behind that lock.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .._db import utcnow
from .._schema import serialized_transaction
from .models import AuditEntry

__all__ = ["GENESIS", "AuditWriteError", "AuditWriter", "append", "append_many", "entry_hash",
           "list_entries", "verify_chain"]

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


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _printable(text: str) -> str:
    """Control characters as `\\xNN` (a request path may carry a NUL, which PostgreSQL's
    text refuses, or line breaks that would forge lines in an exported log)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def append_many(session: Session, items: list[dict[str, Any]]) -> list[AuditEntry]:
    """Append entries (dicts of `actor`, `method`, `path`, `status`, `client`) in order, in
    one transaction, chained to the newest entry."""
    with _lock:
        serialized_transaction(session, "audit")
        last = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1)).first()
        prev = last.hash if last else GENESIS
        entries = []
        for item in items:
            ts = utcnow()
            entry = AuditEntry(ts=ts, actor=_printable(item["actor"])[:160],
                               method=_printable(item["method"]),
                               path=_printable(item["path"])[:500], status=item["status"],
                               client=_printable(item["client"])[:64], prev_hash=prev)
            entry.hash = prev = entry_hash(prev, ts=_ts(ts), actor=entry.actor,
                                           method=entry.method, path=entry.path,
                                           status=entry.status, client=entry.client)
            session.add(entry)
            entries.append(entry)
        session.commit()
        return entries


def append(session: Session, *, actor: str, method: str, path: str, status: int,
           client: str) -> AuditEntry:
    return append_many(session, [dict(actor=actor, method=method, path=path, status=status,
                                      client=client)])[0]


@dataclass
class _Pending:
    item: dict[str, Any]
    done: bool = False
    error: BaseException | None = None


class AuditWriteError(RuntimeError):
    """This request's audit entry could not be written (the cause is chained)."""


class AuditWriter:
    """Group commit for one process: a thread that appends while another batch is being
    written waits, and the next writer takes every entry queued meanwhile in one
    transaction. `append` returns once the caller's entry is committed, or raises
    `AuditWriteError`. A batch that fails is written again one entry per transaction, so
    one entry the database refuses fails only its own request."""

    def __init__(self, sessions: Callable[[], Session]) -> None:
        self._sessions = sessions
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._writing = False
        self.batches = 0  # transactions written (tests and metrics)

    def _write(self, batch: list[_Pending]) -> None:
        try:
            with self._sessions() as session:
                append_many(session, [p.item for p in batch])
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
        for p in batch:  # one at a time: only what the database refuses fails
            try:
                with self._sessions() as session:
                    append_many(session, [p.item])
            except Exception as exc:
                p.error = exc

    def append(self, **item: Any) -> None:
        mine = _Pending(item)
        with self._cond:
            self._queue.append(mine)
            while not mine.done:
                if self._writing:
                    self._cond.wait()
                    continue
                self._writing = True
                batch, self._queue = self._queue, []
                self._cond.release()
                try:
                    self._write(batch)
                finally:
                    self._cond.acquire()
                    self._writing = False
                    self.batches += 1
                    for p in batch:
                        p.done = True
                    self._cond.notify_all()
        if mine.error is not None:
            raise AuditWriteError(f"audit entry not written: {mine.error}") from mine.error


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
