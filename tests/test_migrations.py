"""Schema migrations (Alembic): the migrations match the models, a database written before
migrations existed is refused by the server until `edgewise server migrate` adopts it, with
every row kept, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import secrets
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from edgewise.server._db import make_engine, normalise_url
from edgewise.server._schema import (
    FIRST_REVISION,
    SchemaError,
    _config,
    current_revision,
    head_revision,
    migrate,
    target_metadata,
)
from edgewise.server.client import OperatorClient, publish_bundle
from edgewise.sim import ServerProcess, edgewise_command
from tests._postgres import pg_bin_dir, throwaway_postgres
from tests.conftest import make_tiny_bundle

needs_postgres = pytest.mark.skipif(pg_bin_dir() is None and not os.environ.get("CI"),
                                    reason="PostgreSQL binaries not installed")
DATABASES = ["sqlite", pytest.param("postgresql", marks=needs_postgres)]


@contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'srv' / 'edgewise.db'}"
    else:
        with throwaway_postgres() as url:
            yield url


@pytest.mark.parametrize("kind", DATABASES)
def test_the_migrations_build_exactly_the_models_schema(kind: str, tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    (tmp_path / "srv").mkdir()
    with database(kind, tmp_path) as url:
        engine = make_engine(url)
        assert migrate(engine) == (None, head_revision())
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(
                connection, opts={"compare_type": True}), target_metadata)
        engine.dispose()
    # A model changed without a migration shows up here.
    assert diff == []


def run_server(data: Path, keys, db_url: str | None, token: str) -> ServerProcess:
    return ServerProcess(data_dir=data, root_path=keys.root_json,
                         online_key_path=keys.online_key, admin_token=token, db_url=db_url,
                         log_path=data.parent / "server.log")


@pytest.mark.slow
@pytest.mark.parametrize("kind", DATABASES)
def test_a_database_from_before_migrations_is_migrated_with_nothing_lost(
        kind: str, tmp_path: Path, keys) -> None:
    data, token = tmp_path / "srv", secrets.token_urlsafe(24)
    with database(kind, tmp_path) as url:
        db_url = None if kind == "sqlite" else url
        # Data written by a server, in the schema of 0.1.0 (revision 0001)...
        server = run_server(data, keys, db_url, token).start()
        with OperatorClient(server.url, token=token) as client:
            client.create_enrollment_token()
            release = publish_bundle(client, make_tiny_bundle(tmp_path / "b"),
                                     root_path=keys.root_json,
                                     targets_key_path=keys.targets_key)
            events_before = len(client.events())
        server.stop()
        # ...brought back to that schema, and without the version table, as every database
        # written before migrations is.
        engine = create_engine(normalise_url(url))
        with engine.connect() as connection:
            assert current_revision(connection) == head_revision() != FIRST_REVISION
            from alembic import command

            command.downgrade(_config(connection), FIRST_REVISION)
            connection.execute(text("DROP TABLE alembic_version"))
            connection.commit()
            assert "device_nonces" not in inspect(connection).get_table_names()
        engine.dispose()

        # The server refuses it and says what to run.
        with pytest.raises(RuntimeError, match="exited with 1"):
            run_server(data, keys, db_url, token).start()
        assert "edgewise server migrate" in (tmp_path / "server.log").read_text()

        args = ["server", "migrate", "--data", str(data)] + (["--db", url] if db_url else [])
        result = subprocess.run(edgewise_command(*args), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"before migrations (0.1.0) to revision {head_revision()}" in result.stderr
        again = subprocess.run(edgewise_command(*args), capture_output=True, text=True,
                               timeout=120)
        assert "already at revision" in again.stderr

        server = run_server(data, keys, db_url, token).start()
        try:
            with OperatorClient(server.url, token=token) as client:
                assert [r["id"] for r in client.releases()] == [release["id"]]
                assert len(client.events()) >= events_before
        finally:
            server.stop()


def test_migrate_refuses_a_database_that_is_not_edgewise_and_changes_nothing(
        tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO customers (name) VALUES ('ada')")
    engine = make_engine(f"sqlite:///{path}")
    with pytest.raises(SchemaError, match="not an Edgewise server database"):
        migrate(engine)
    engine.dispose()
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"customers"}
        assert db.execute("SELECT name FROM customers").fetchall() == [("ada",)]


def test_migrate_cli_without_a_database_says_so(tmp_path: Path) -> None:
    result = subprocess.run(edgewise_command("server", "migrate", "--data", str(tmp_path)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no database at" in result.stderr
