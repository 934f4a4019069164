"""Real Edgewise processes on this machine: an update server and device agents.

Used by `edgewise demo`, the integration tests and the fleet simulator, so that what is
rehearsed is the shipped code path (`python -m edgewise ...`), not a reimplementation.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..trust import client_tls

__all__ = ["AgentProcess", "ServerProcess", "edgewise_command", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edgewise_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgewise", *args]


@dataclass
class ServerProcess:
    data_dir: Path
    root_path: Path
    online_key_path: Path
    admin_token: str
    port: int = field(default_factory=free_port)
    db_url: str | None = None
    rollout_tick_s: float = 2.0
    mqtt_url: str | None = None
    mqtt_ca: Path | None = None
    tls_cert: Path | None = None  # without a certificate the server runs --insecure-dev
    tls_key: Path | None = None
    ca_path: Path | None = None  # what clients pin (to check readiness over TLS)
    log_path: Path | None = None
    extra_args: tuple[str, ...] = ()  # more `edgewise server run` options
    workers: int = 1  # server processes on this port (PostgreSQL only above 1)
    env: dict[str, str] = field(default_factory=dict)  # more environment (e.g. credentials)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self, *, timeout_s: float = 30.0) -> ServerProcess:
        args = ["server", "run", "--data", str(self.data_dir), "--root", str(self.root_path),
                "--online-key", str(self.online_key_path), "--host", "127.0.0.1",
                "--port", str(self.port), "--rollout-tick-s", str(self.rollout_tick_s)]
        if self.db_url:
            args += ["--db", self.db_url]
        if self.tls_cert:
            args += ["--tls-cert", str(self.tls_cert), "--tls-key", str(self.tls_key)]
        else:
            args.append("--insecure-dev")
        if self.mqtt_url:
            args += ["--mqtt-url", self.mqtt_url]
            if self.mqtt_ca:
                args += ["--mqtt-ca", str(self.mqtt_ca)]
        if self.workers > 1:
            args += ["--workers", str(self.workers)]
        args += self.extra_args
        log = open(self.log_path or os.devnull, "ab")
        env = {**os.environ, "EDGEWISE_ADMIN_TOKEN": self.admin_token, **self.env}
        self.proc = subprocess.Popen(edgewise_command(*args), stdout=log, stderr=log, env=env)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1,
                             verify=client_tls(self.ca_path)).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server did not come up within {timeout_s}s (log: {self.log_path})")

    def stop(self) -> None:
        _terminate(self.proc)


@dataclass
class AgentProcess:
    state_dir: Path
    poll_interval_s: float = 1.0
    fault: str | None = None  # STATE[:before|after], see edgewise.agent.FaultPoint
    once: bool = False
    api_port: int | None = None
    mqtt_url: str | None = None
    mqtt_ca: Path | None = None
    log_path: Path | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        args = ["agent", "run", "--state", str(self.state_dir),
                "--poll-interval-s", str(self.poll_interval_s)]
        args += ["--api-port", str(self.api_port)] if self.api_port else ["--no-api"]
        if self.once:
            args.append("--once")
        if self.mqtt_url:
            args += ["--mqtt-url", self.mqtt_url]
            if self.mqtt_ca:
                args += ["--mqtt-ca", str(self.mqtt_ca)]
        env = dict(os.environ)
        env.pop("EDGEWISE_FAULT", None)
        if self.fault:
            env["EDGEWISE_FAULT"] = self.fault
        log = open(self.log_path or os.devnull, "ab")
        self.proc = subprocess.Popen(edgewise_command(*args), stdout=log, stderr=log, env=env)
        log.close()
        return self

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        _terminate(self.proc)


def _terminate(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (a server and its uvicorn workers), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def tree_cpu_s(pid: int) -> float:
    """CPU time (user + system) of `pid` and its live descendants so far, seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return total


def listening_postmaster(port: int) -> int | None:
    """The PostgreSQL postmaster started with `-p PORT`, if one runs here."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"postgres") and b"-p" in args and \
                str(port).encode() in args:
            return int(cmdline.parent.name)
    return None


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its descendants, MB."""
    total = 0.0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except (OSError, ValueError):
            continue
    return total
