"""The audit log under load and across replicas: a process's concurrent requests are written
in batches (group commit), and two server processes appending to one PostgreSQL keep one
unbroken chain (the advisory lock held from reading the last entry to committing)."""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from edgewise.server._schema import ensure_schema
from edgewise.server.audit import service
from tests._postgres import pg_bin_dir, throwaway_postgres


def _entries(sessions) -> list[dict]:
    with sessions() as session:
        return [service.to_json(e) for e in service.list_entries(session, limit=10_000)]


def test_concurrent_requests_are_written_together_in_one_chain(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    ensure_schema(engine)
    sessions = sessionmaker(engine)
    writer = service.AuditWriter(sessions)
    threads, per_thread = 24, 10

    def requests(t: int) -> None:
        for i in range(per_thread):
            writer.append(actor=f"device:d{t}", method="POST", path=f"/api/v1/x/{t}/{i}",
                          status=204, client="127.0.0.1")

    workers = [threading.Thread(target=requests, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    entries = _entries(sessions)
    assert len(entries) == threads * per_thread
    assert service.verify_chain(entries) == (True, None, "ok")
    # Each request's own entries are in its order; many shared a transaction.
    for t in range(threads):
        mine = [e["path"] for e in entries if e["actor"] == f"device:d{t}"]
        assert mine == [f"/api/v1/x/{t}/{i}" for i in range(per_thread)]
    assert writer.batches < threads * per_thread / 2


def test_a_failed_batch_fails_each_of_its_requests_and_the_next_one_writes(tmp_path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    ensure_schema(engine)
    sessions = sessionmaker(engine)
    broken = service.AuditWriter(lambda: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(service.AuditWriteError, match="disk gone"):
        broken.append(actor="a", method="POST", path="/p", status=200, client="c")
    writer = service.AuditWriter(sessions)
    writer.append(actor="a", method="POST", path="/p", status=200, client="c")
    assert len(_entries(sessions)) == 1


def _replica(url: str, name: str, n: int, together) -> None:
    sessions = sessionmaker(create_engine(url))
    writer = service.AuditWriter(sessions)
    rng = random.Random(name)
    with sessions() as session:  # connected: both start appending at once
        session.connection()
    together.wait(timeout=60)
    for i in range(n):
        writer.append(actor=f"operator:{name}", method="POST", path=f"/{name}/{i}",
                      status=200, client="127.0.0.1")
        time.sleep(rng.uniform(0, 0.003))


def test_two_replicas_on_one_postgresql_keep_one_chain() -> None:
    if pg_bin_dir() is None and not os.environ.get("CI"):
        pytest.skip("PostgreSQL binaries not installed")
    with throwaway_postgres() as url:
        engine = create_engine(url)
        ensure_schema(engine)
        n, ctx = 60, multiprocessing.get_context("spawn")
        together = ctx.Barrier(2)
        procs = [ctx.Process(target=_replica, args=(url, name, n, together)) for name in "ab"]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0
        entries = _entries(sessionmaker(engine))
        engine.dispose()
    assert len(entries) == 2 * n
    # Without the advisory lock both replicas read the same newest entry now and then and
    # chain to it: the chain forks and verification fails at the second of the two.
    assert service.verify_chain(entries) == (True, None, "ok")
    a = [e["id"] for e in entries if e["actor"] == "operator:a"]
    b = [e["id"] for e in entries if e["actor"] == "operator:b"]
    assert min(b) < max(a) and min(a) < max(b)  # they did interleave


def test_an_entry_the_database_refuses_fails_only_its_own_request(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    ensure_schema(engine)
    sessions = sessionmaker(engine)
    writer = service.AuditWriter(sessions)
    good = dict(actor="operator:a", method="POST", client="127.0.0.1", status=200)
    batch = [service._Pending({**good, "path": "/one"}),
             service._Pending({**good, "path": "/two", "status": None}),  # NOT NULL
             service._Pending({**good, "path": "/three"})]
    writer._write(batch)  # as one group commit would
    assert [p.error is None for p in batch] == [True, False, True]
    entries = _entries(sessions)
    assert [e["path"] for e in entries] == ["/one", "/three"]
    assert service.verify_chain(entries) == (True, None, "ok")


def test_control_characters_in_a_request_are_kept_printable(tmp_path: Path) -> None:
    # A NUL in a path (POST /x%00) is refused by PostgreSQL's text; a line break would
    # forge a line in an exported log. Both are stored escaped, and the chain verifies.
    engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    ensure_schema(engine)
    sessions = sessionmaker(engine)
    service.AuditWriter(sessions).append(actor="anonymous", method="POST",
                                         path="/x\x00\nforged", status=404, client="::1")
    (entry,) = _entries(sessions)
    assert entry["path"] == "/x\\x00\\x0aforged"
    assert service.verify_chain([entry])[0]
