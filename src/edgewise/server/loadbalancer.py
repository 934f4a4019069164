"""Several server replicas behind one address: an nginx configuration and its process.

Replicas are stateless (shared PostgreSQL, shared artifact store, scheduled work under
advisory locks), so any replica may answer any request. nginx (Debian's `nginx-light`)
spreads requests over them and stops sending to one that refuses connections:

- a request that could not reach a replica (connection refused, or the replica died before
  answering an idempotent request) is passed to the next one, so killing a replica loses
  nothing a device notices; a POST whose replica died after reading it is not repeated by
  nginx (it might have been applied) and the device re-sends it, signed anew, at its next
  cycle (agents keep unsent reports in their outbox);
- the request target goes upstream unchanged: devices sign the exact path and query;
- request and response bodies are streamed (uploads of large artifacts, long polls), and the
  body size limit is the application's (`--max-upload-gb`);
- `X-Forwarded-For`/`-Proto` carry the device's address and scheme (uvicorn trusts them
  from loopback only).

TLS ends at nginx when it is given a certificate; replicas then listen on loopback only.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

__all__ = ["LoadBalancer", "NginxNotFound", "nginx_binary", "nginx_config"]


class NginxNotFound(RuntimeError):
    """nginx is not installed."""


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)),
        None)
    if found is None:
        raise NginxNotFound("nginx is not installed (Debian: apt-get install nginx-light)")
    return found


def _host_port(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"upstream {url!r}: use http://HOST:PORT (replicas speak plain HTTP "
                         "behind the load balancer)")
    return f"{parts.hostname}:{parts.port}"


def nginx_config(*, listen: str, upstreams: list[str], prefix: Path,
                 tls_cert: Path | None = None, tls_key: Path | None = None,
                 connect_timeout_s: float = 2.0, read_timeout_s: float = 600.0,
                 fail_timeout_s: float = 5.0) -> str:
    """A complete nginx.conf that serves `listen` (HOST:PORT) from `upstreams`
    (http://HOST:PORT each); logs and temp files under `prefix`."""
    if not upstreams:
        raise ValueError("a load balancer needs at least one upstream replica")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and its key")
    servers = "\n".join(f"        server {_host_port(u)} max_fails=1 "
                        f"fail_timeout={fail_timeout_s:g}s;" for u in upstreams)
    ssl = (f"        ssl_certificate {tls_cert.resolve()};\n"
           f"        ssl_certificate_key {tls_key.resolve()};\n"
           "        ssl_protocols TLSv1.2 TLSv1.3;\n") if tls_cert and tls_key else ""
    tmp = prefix / "tmp"
    # Run by root, nginx's workers would become `nobody` and could not use the directories
    # under `prefix` that the invoking user made: they stay that user.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    return f"""# Written by edgewise.server.loadbalancer (`edgewise server lb`): do not edit.
{user}worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp / "body"};
    proxy_temp_path {tmp / "proxy"};
    fastcgi_temp_path {tmp / "fastcgi"};
    uwsgi_temp_path {tmp / "uwsgi"};
    scgi_temp_path {tmp / "scgi"};
    upstream edgewise {{
{servers}
        keepalive 64;
    }}
    server {{
        listen {listen}{" ssl" if ssl else ""};
{ssl}        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        location / {{
            proxy_pass http://edgewise;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_connect_timeout {connect_timeout_s:g}s;
            proxy_read_timeout {read_timeout_s:g}s;
            proxy_send_timeout {read_timeout_s:g}s;
            proxy_next_upstream error timeout http_502;
            proxy_next_upstream_tries 3;
        }}
    }}
}}
"""


@dataclass
class LoadBalancer:
    """nginx in the foreground with a generated configuration (`start` / `stop`)."""

    listen: str  # HOST:PORT
    upstreams: list[str]
    prefix: Path
    tls_cert: Path | None = None
    tls_key: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://{self.listen}"

    def write_config(self) -> Path:
        for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(nginx_config(listen=self.listen, upstreams=self.upstreams,
                                     prefix=self.prefix.resolve(), tls_cert=self.tls_cert,
                                     tls_key=self.tls_key))
        return conf

    def command(self) -> list[str]:
        conf = self.write_config()
        return [nginx_binary(), "-p", str(self.prefix.resolve()), "-c", str(conf.resolve()),
                "-g", "daemon off;"]

    def check(self) -> None:
        """`nginx -t`: the configuration parses (its message when not)."""
        cmd = self.command()
        done = subprocess.run([*cmd[:-2], "-t"], capture_output=True, text=True)
        if done.returncode != 0:
            raise ValueError(f"nginx refused the configuration: {done.stderr.strip()}")

    def start(self, *, timeout_s: float = 10.0, verify: bool | str = True) -> LoadBalancer:
        self.check()
        log = open(self.prefix / "nginx.out", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: "
                                   f"{(self.prefix / 'error.log').read_text()[-2000:]}")
            try:
                httpx.get(f"{self.url}/healthz", timeout=1, verify=verify)
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nginx did not listen on {self.listen} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: finish requests in flight
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
