"""A throwaway Mosquitto broker with TLS (certificates from `edgewise.trust.init_certs`)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgewise.sim import free_port
from edgewise.trust import init_certs


@dataclass(frozen=True)
class Broker:
    url: str
    ca: Path
    port: int


@contextmanager
def tls_mosquitto(workdir: Path) -> Iterator[Broker]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    certs = init_certs(workdir / "certs", hostnames=["127.0.0.1", "localhost"])
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {certs.ca_cert}\ncertfile {certs.server_cert}\nkeyfile {certs.server_key}\n"
        "tls_version tlsv1.2\nallow_anonymous true\npersistence false\n"
        # Started as root, Mosquitto would drop to its own user, which cannot read pytest's
        # private temp dirs: keep the test broker as the user that made the keys.
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    log = open(workdir / "mosquitto.log", "ab")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
    log.close()
    try:
        deadline = time.monotonic() + 15
        ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock, \
                        ctx.wrap_socket(sock, server_hostname="127.0.0.1"):
                    break
            except OSError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mosquitto did not start: {(workdir / 'mosquitto.log').read_text()}"
                    ) from exc
                time.sleep(0.1)
        yield Broker(url=f"mqtts://127.0.0.1:{port}", ca=certs.ca_cert, port=port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
