"""A throwaway PostgreSQL cluster (initdb in a temp dir, a free port, trust auth), so a
rehearsal never touches a shared database. Runs the binaries as `postgres` under root."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ._processes import free_port

__all__ = ["PostgresCluster", "postgres_cluster", "throwaway_postgres"]


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresCluster:
    """A running throwaway cluster: its URL, and a restart (as an operator or a crash would
    do it) for fault tests."""

    url: str
    data: Path
    base: Path
    port: int
    bin_dir: Path

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.base} -h 127.0.0.1 -F -c max_connections=200",
                  "start")
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres "
                                "dbname=postgres").close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, mode: str = "fast") -> None:
        """`fast`: disconnects every client, then stops; `immediate`: like a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "stop")


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="edgewise-sim-pg-"))
    port = free_port()
    cluster = PostgresCluster(url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
                              data=base / "data", base=base, port=port, bin_dir=bin_dir)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    try:
        cluster._run("initdb", "-D", str(cluster.data), "-A", "trust", "-U", "postgres",
                     "--no-sync")
        cluster.start()
        yield cluster
    finally:
        with suppress(Exception):
            cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A throwaway cluster's SQLAlchemy URL, for the duration of the block."""
    with postgres_cluster() as cluster:
        yield cluster.url
