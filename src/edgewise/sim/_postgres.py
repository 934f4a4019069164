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
from pathlib import Path

from ._processes import free_port

__all__ = ["throwaway_postgres"]


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="edgewise-sim-pg-"))
    data = base / "data"
    port = free_port()
    as_root = os.geteuid() == 0

    def run(*args: str) -> None:
        cmd = [str(bin_dir / args[0]), *args[1:]]
        if as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    if as_root:
        shutil.chown(base, "postgres", "postgres")
    try:
        run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        run("pg_ctl", "-D", str(data), "-l", str(base / "log"), "-w", "-o",
            f"-p {port} -k {base} -h 127.0.0.1 -F -c max_connections=200", "start")
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(f"host=127.0.0.1 port={port} user=postgres "
                                "dbname=postgres").close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        with suppress(Exception):
            run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)
