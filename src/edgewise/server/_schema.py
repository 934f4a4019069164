"""The database schema's version: Alembic migrations (`migrations/`), checked at start-up.

Invariant: a server serves only a database whose schema is at the head revision. An empty
database is brought there when the server starts; a database at an older revision, or one
written before migrations existed (no `alembic_version` table), is refused with the command
that upgrades it (`edgewise server migrate`), which never drops data. On PostgreSQL every
schema change holds an advisory lock, so replicas starting together migrate once.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, MetaData, create_engine, inspect, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["FIRST_REVISION", "SchemaError", "current_revision", "ensure_schema", "exclusive",
           "head_revision", "migrate", "serialized", "serialized_transaction", "target_metadata"]

FIRST_REVISION = "0001"  # the schema of Edgewise 0.1.0, before migrations existed
_LOCK_KEY = 0x45646765  # "Edge": the advisory lock every schema change takes (PostgreSQL)
# Scheduled work that must run on one replica at a time, each under its own advisory lock.
_WORK_KEYS = {"rollout-tick": _LOCK_KEY + 1, "notify": _LOCK_KEY + 2}
# Work every replica may do, but one at a time (each waits for the lock).
_SERIAL_KEYS = {"tuf-metadata": _LOCK_KEY + 3, "audit": _LOCK_KEY + 4}


class SchemaError(ValueError):
    """The database's schema is not the one this server needs (the message says what to do)."""


def _models_metadata() -> MetaData:
    # Every domain's models module registers its tables on Base.metadata.
    from ._db import Base
    from .audit import models as _audit  # noqa: F401
    from .devices import models as _devices  # noqa: F401
    from .director import models as _director  # noqa: F401
    from .events import models as _events  # noqa: F401
    from .feedback import models as _feedback  # noqa: F401
    from .groups import models as _groups  # noqa: F401
    from .notify import models as _notify  # noqa: F401
    from .releases import models as _releases  # noqa: F401
    from .rollouts import models as _rollouts  # noqa: F401
    from .tokens import models as _tokens  # noqa: F401

    return Base.metadata


target_metadata = _models_metadata()


def _config(connection: Connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "edgewise.server:migrations")
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    config = _config(None)  # type: ignore[arg-type]
    return ScriptDirectory.from_config(config).get_current_head() or FIRST_REVISION


def current_revision(connection: Connection) -> str | None:
    """The revision the database says it is at; None when it has no `alembic_version`."""
    from alembic.runtime.migration import MigrationContext

    if "alembic_version" not in inspect(connection).get_table_names():
        return None
    return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
            connection.commit()
        try:
            yield connection
        finally:
            if connection.dialect.name == "postgresql":
                connection.rollback()
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                connection.commit()


_LOCAL_LOCKS = {work: threading.Lock() for work in _WORK_KEYS}


@dataclass(frozen=True)
class Lease:
    """The right to do one piece of scheduled work now (`exclusive`)."""

    connection: Connection | None  # PostgreSQL: the connection holding the advisory lock

    def session(self, sessions: sessionmaker[Session]) -> Session:
        """A session for the leased work. On PostgreSQL it runs on the lock's own connection:
        a replica whose lock went away with its connection (a network cut, a terminated
        backend) cannot commit anything more, while another replica takes the lock over."""
        return sessions(bind=self.connection) if self.connection is not None else sessions()


@contextmanager
def exclusive(engine: Engine, work: str) -> Iterator[Lease | None]:
    """A lease if this process may do `work` now, else None: on PostgreSQL, for the one
    replica that holds its advisory lock (held until the block ends; a replica that dies
    releases it with its connection); the others get None and skip. SQLite serves one
    process: a lease unless another thread of it holds this work."""
    if engine.dialect.name != "postgresql":
        # One process, but several threads (the tick loop, a request's first tick): they
        # take turns too, or both would add the same rollout members.
        lock = _LOCAL_LOCKS[work]
        if not lock.acquire(blocking=False):
            yield None
            return
        try:
            yield Lease(None)
        finally:
            lock.release()
        return
    key = _WORK_KEYS[work]
    with engine.connect() as connection:
        got = bool(connection.execute(text("SELECT pg_try_advisory_lock(:k)"),
                                      {"k": key}).scalar())
        connection.commit()
        try:
            yield Lease(connection) if got else None
        finally:
            if got:
                with suppress(DBAPIError):  # a lost connection has released it already
                    connection.rollback()
                    connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    connection.commit()


@contextmanager
def serialized(engine: Engine, work: str, *, lock_file: Path) -> Iterator[None]:
    """Wait until no other server process does `work`, then do it: on PostgreSQL under an
    advisory lock (replicas on any host), on SQLite under a file lock (the processes of one
    host; an SQLite database is not shared further)."""
    if engine.dialect.name != "postgresql":
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        with lock_file.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    key = _SERIAL_KEYS[work]
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        connection.commit()
        try:
            yield
        finally:
            with suppress(DBAPIError):  # a lost connection has released it already
                connection.rollback()
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                connection.commit()


def serialized_transaction(session: Session, work: str, *, lock_timeout_s: float = 10.0
                           ) -> None:
    """Make the rest of `session`'s transaction wait until no other server process's
    transaction does `work`: a PostgreSQL advisory lock the commit or rollback releases
    (waited for at most `lock_timeout_s`, then the database refuses: a replica stuck while
    holding it must not stop every other replica's writes for good). SQLite serves one
    server process (`--workers` above 1 is refused), whose own lock is the caller's."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'"))
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SERIAL_KEYS[work]})


def _upgrade(connection: Connection, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(_config(connection), revision)
    connection.commit()


def _user_tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names()) - {"alembic_version"}


def ensure_schema(engine: Engine) -> None:
    """At server start: create the schema in an empty database, accept one at head, and refuse
    anything else with the command to run."""
    with _schema_lock(engine) as connection:
        if not _user_tables(connection):
            _upgrade(connection)
            return
        current, head = current_revision(connection), head_revision()
        if current == head:
            return
        what = ("was written by an Edgewise before schema migrations" if current is None
                else f"is at schema revision {current}")
        raise SchemaError(f"the database {what}; this server needs revision {head}. Back it "
                          "up, then run `edgewise server migrate` with the same --data/--db")


def _first_revision_tables() -> set[str]:
    """The tables revision 0001 creates, found by applying it to a scratch database."""
    scratch = create_engine("sqlite://")
    with scratch.connect() as connection:
        _upgrade(connection, FIRST_REVISION)
        return _user_tables(connection)


def migrate(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to the head revision; returns (revision before, revision after).
    A database from before migrations is recognised as revision 0001 when it has its tables."""
    with _schema_lock(engine) as connection:
        tables = _user_tables(connection)
        before = current_revision(connection)
        if before is None and tables:
            missing = _first_revision_tables() - tables
            if missing:
                raise SchemaError("this database is not an Edgewise server database (no "
                                  f"{', '.join(sorted(missing)[:5])}); nothing was changed")
            from alembic import command

            command.stamp(_config(connection), FIRST_REVISION)
            connection.commit()
        _upgrade(connection)
        return before, current_revision(connection) or head_revision()
