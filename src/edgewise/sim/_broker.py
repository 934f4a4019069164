"""A real Mosquitto broker with TLS for a rehearsal (certificates from
`edgewise.trust.init_certs`), stoppable and restartable on the same port for broker outages.

Invariant: the broker is the Debian `mosquitto` binary the product runs against, not a fake;
stopping it drops every connection exactly as a broker crash would.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..trust import init_certs
from ._processes import free_port

__all__ = ["BrokerProcess"]


@dataclass
class BrokerProcess:
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.certs = init_certs(self.workdir / "certs", hostnames=["127.0.0.1", "localhost"])
        self.conf = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {self.certs.ca_cert}\ncertfile {self.certs.server_cert}\n"
            f"keyfile {self.certs.server_key}\n"
            "tls_version tlsv1.2\nallow_anonymous true\n"
            # Sessions and queued QoS 1 messages survive a clean restart, as in production.
            f"persistence true\npersistence_location {self.workdir}/\n"
            # Started as root, Mosquitto would drop to its own user, which cannot read private
            # temp dirs: keep the broker as the user that made the keys.
            + ("user root\n" if os.geteuid() == 0 else ""))

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.certs.ca_cert

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, timeout_s: float = 15.0) -> BrokerProcess:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed (make system-deps installs it)")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        ctx = ssl.create_default_context(cafile=str(self.certs.ca_cert))
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock, \
                        ctx.wrap_socket(sock, server_hostname="127.0.0.1"):
                    return self
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not start on port {self.port}: "
                                       f"{self.log_path.read_text()[-2000:]}") from exc
                time.sleep(0.1)

    def stop(self, *, hard: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill() if hard else self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
