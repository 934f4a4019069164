"""A tiny real container app for the app-release tests: a static C HTTP server (gcc -static,
FROM scratch, ~0.7 MB) that answers its version from /version.txt (or the file named by
$VERSION_FILE: a config component's), and 500 on /health when that version starts with
"broken", 503 for its first 4-5 seconds when it starts with "slow" (an app that takes a while
to get ready). Versions differ only in the version.txt layer. Also the engines that run it:
podman with a store per test, or a docker daemon of the tests' own (`PrivateDockerd`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import NoReturn

import pytest

from edgewise.artifacts import AppManifest, build_app

SERVER_C = r"""
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static char version[256] = "unknown";
#include <arpa/inet.h>
static int check(int port) { /* `server check`: the health command, GET /health answers 200 */
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  char buf[64] = {0};
  if (connect(s, (struct sockaddr *)&a, sizeof a)) return 1;
  const char *req = "GET /health HTTP/1.0\r\n\r\n";
  if (write(s, req, strlen(req)) < 0 || read(s, buf, sizeof buf - 1) < 12) return 1;
  return strncmp(buf + 9, "200", 3) != 0;
}
int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "check") == 0)
    return check(getenv("PORT") ? atoi(getenv("PORT")) : 8080);
  const char *vf = getenv("VERSION_FILE"); /* e.g. a config component's file */
  FILE *f = fopen(vf ? vf : "/version.txt", "r");
  if (f) {
    if (!fgets(version, sizeof version, f)) version[0] = 0;
    fclose(f);
    version[strcspn(version, "\n")] = 0;
  }
  time_t started = time(0);
  const char *p = getenv("PORT");
  int port = p ? atoi(p) : 8080, one = 1;
  signal(SIGPIPE, SIG_IGN);
  int s = socket(AF_INET, SOCK_STREAM, 0);
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) { perror("bind"); return 1; }
  for (;;) {
    int c = accept(s, 0, 0);
    if (c < 0) continue;
    char req[1024];
    ssize_t n = read(c, req, sizeof req - 1);
    req[n > 0 ? n : 0] = 0;
    int code = 200;
    if (strncmp(req, "GET /health", 11) == 0 && strncmp(version, "broken", 6) == 0)
      code = 500;
    else if (strncmp(req, "GET /health", 11) == 0 && strncmp(version, "slow", 4) == 0
             && time(0) - started < 5)
      code = 503;
    char out[600];
    int len = snprintf(out, sizeof out, "HTTP/1.0 %d %s\r\nContent-Type: text/plain\r\n"
                       "Content-Length: %zu\r\nConnection: close\r\n\r\n%s\n", code,
                       code == 200 ? "OK" : code == 500 ? "Internal Server Error"
                       : "Service Unavailable", strlen(version) + 1, version);
    if (write(c, out, len) < 0) perror("write");
    close(c);
  }
}
"""


def _skip_or_fail(why: str, what: str) -> NoReturn:
    """Skip when this machine cannot run `what`; in CI (where `make system-deps` installs it)
    that is a failure, not a skip."""
    if os.environ.get("CI"):
        pytest.fail(f"container tests must run in CI: {why}")
    pytest.skip(f"{what} ({why}; make system-deps)")


def require_podman() -> None:
    """Skip when this machine cannot run containers at all; in CI (which installs podman,
    runc and skopeo through `make system-deps`) that is a failure, not a skip."""
    missing = [t for t in ("podman", "skopeo", "gcc") if shutil.which(t) is None]
    why = f"not installed: {', '.join(missing)}" if missing else None
    if why is None:
        probe = subprocess.run(["podman", "--version"], capture_output=True, text=True)
        if probe.returncode != 0:
            why = f"podman does not run: {probe.stderr.strip()}"
    if why is not None:
        _skip_or_fail(why, "container apps need podman + skopeo + gcc")


class PrivateDockerd:
    """A docker daemon of the tests' own: its storage, run-time files, pid file and socket all
    under `directory`, no bridge network and no iptables rules (apps use the host network),
    so it neither needs nor touches a system daemon. `stop` removes its containers, stops
    it (dockerd stops the containerd it started) and unmounts what it left mounted."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.host = f"unix://{self.directory / 'docker.sock'}"
        self.log_path = self.directory / "dockerd.log"
        self.process: subprocess.Popen | None = None

    def docker(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", *args], capture_output=True, text=True,
                              env={**os.environ, "DOCKER_HOST": self.host}, timeout=timeout_s)

    def start(self, timeout_s: float = 60) -> PrivateDockerd:
        self.directory.mkdir(parents=True, exist_ok=True)
        d = self.directory
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["dockerd", "--data-root", str(d / "data"), "--exec-root", str(d / "exec"),
                 "--pidfile", str(d / "dockerd.pid"), "-H", self.host, "--bridge=none",
                 "--iptables=false",
                 # Where a system containerd runs, dockerd uses it: keep out of its "moby".
                 "--containerd-namespace", f"edgewise-{os.getpid()}",
                 "--containerd-plugins-namespace", f"edgewise-{os.getpid()}-plugins"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.process.returncode}: "
                                   f"{self.log_tail()}")
            if self.docker("version", "--format", "{{.Server.Version}}").returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dockerd did not answer in {timeout_s:g} s: "
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-1500:]

    def reset(self) -> None:
        """Remove every container and image: the next test starts from an empty daemon."""
        ids = self.docker("ps", "-aq").stdout.split()
        if ids:
            self.docker("rm", "-f", *ids)
        images = self.docker("images", "-aq").stdout.split()
        if images:
            self.docker("rmi", "-f", *set(images))

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.reset()
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        # dockerd stops the containerd it started; one it lost still runs our config.
        pid_file = self.directory / "exec" / "containerd" / "containerd.pid"
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            cmdline = b""
        if str(pid_file.parent).encode() in cmdline:
            os.kill(pid, signal.SIGTERM)
        with open("/proc/self/mounts") as mounts:  # e.g. exec/netns/default (nsfs)
            left = [line.split()[1] for line in mounts
                    if line.split()[1].startswith(f"{self.directory}/")]
        for mount in reversed(left):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        self.process = None


def start_private_dockerd(directory: Path) -> PrivateDockerd:
    """A started `PrivateDockerd`, or a skip (a failure in CI) saying why docker cannot run
    here."""
    missing = [t for t in ("dockerd", "docker", "skopeo", "gcc") if shutil.which(t) is None]
    if missing:
        _skip_or_fail(f"not installed: {', '.join(missing)}",
                      "container apps on docker need docker.io + skopeo + gcc")
    try:
        return PrivateDockerd(directory).start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        _skip_or_fail(f"dockerd does not run: {exc}", "container apps on docker need a dockerd")


def server_binary(directory: Path) -> Path:
    """The static HTTP server, compiled once per directory."""
    binary = directory / "server"
    if not binary.exists():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "server.c").write_text(SERVER_C)
        subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(binary),
                        str(directory / "server.c")], check=True)
    return binary


def app_context(directory: Path, binary: Path, version_text: str) -> Path:
    """A build context: the server layer (same bytes in every version) and a version layer."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, directory / "server")
    os.utime(directory / "server", (1_700_000_000, 1_700_000_000))  # same layer every time
    (directory / "version.txt").write_text(version_text + "\n")
    (directory / "Containerfile").write_text(
        "FROM scratch\nCOPY server /server\nCOPY version.txt /version.txt\n"
        'ENTRYPOINT ["/server"]\n')
    return directory


def app_section(port: int, **health) -> dict:
    return {"image": "localhost/hello", "env": {"PORT": str(port)}, "ports": [port],
            "restart": "on-failure:3",
            "health": {"http": {"port": port, "path": "/health"}, "timeout_s": 2,
                       "interval_s": 0.2, "retries": 15, **health}}


def build_hello(tmp: Path, binary: Path, version: str, text: str, port: int,
                storage: Path, **health) -> tuple[Path, AppManifest]:
    ctx = app_context(tmp / f"ctx-{version}", binary, text)
    out = tmp / f"hello-{version}"
    return out, build_app(ctx, out, name="hello", version=version,
                          app=app_section(port, **health), storage=storage)


def handmade_layout(directory: Path, files: dict[str, bytes], tag: str = "1") -> Path:
    """An OCI image layout written by hand (no engine): one gzip layer holding `files`."""
    import gzip
    import hashlib
    import io
    import json
    import tarfile

    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def blob(data: bytes, media: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    layer = blob(gzip.compress(raw.getvalue(), mtime=0),
                 "application/vnd.oci.image.layer.v1.tar+gzip")
    config = blob(json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/server"]},
        "rootfs": {"type": "layers", "diff_ids": [
            "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()]}}).encode(),
        "application/vnd.oci.image.config.v1+json")
    manifest = blob(json.dumps({"schemaVersion": 2,
                                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                "config": config, "layers": [layer]}).encode(),
                    "application/vnd.oci.image.manifest.v1+json")
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {**manifest, "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return directory


def reset_store(directory: Path) -> None:
    """Remove every container and image of a podman store of ours and unmount it, so the
    test's directory can be deleted."""
    from edgewise.artifacts import PodmanStore

    store = PodmanStore(directory)
    if store.graph_root.exists():
        subprocess.run(["podman", *store.podman_args(), "system", "reset", "--force"],
                       env={**os.environ, **store.env()}, capture_output=True, timeout=120)
    shutil.rmtree(store.run_root.parent, ignore_errors=True)  # /run/edgewise-HASH
