"""Container apps on the device: the podman/docker backend of the component runtime seam.

Invariant: an app's image is imported from its verified slot (the bundle's OCI layout) into
the agent's own image store before anything is stopped, so a swap never waits on a download;
the device runs at most one container per app (`edgewise-<app name>`), replaced in place by
`activate`; the images of both slots stay in the store, so rolling back to the previous
version only starts it again. Nothing here decides what comes next: the state machine does.

Podman runs with the agent's own store (`STATE/containers/storage`, run-time files under
/run: `artifacts.PodmanStore`) and its own `containers.conf` (runc, ulimits the machine
allows, no systemd needed); docker, when it is what the device has (or is chosen with
`EDGEWISE_CONTAINER_ENGINE=docker`), runs with the daemon's storage, at `DOCKER_HOST` if set.
Docker stores each layer once (a `docker load` skips the layers it already has), but skopeo
streams a whole image to it, so an import reads the shared layers again, locally. Apps get
`--init` (a PID 1 that ignores SIGTERM would make every stop wait out the timeout) and host
networking (they reach the agent's loopback API, and the health check reaches them on
loopback); the current files of every config component that names the app are mounted
read-only into its container (`_configs.mounts_for`) each time it starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from ..artifacts import AppManifest, AppSpec, PodmanStore
from ._configs import mounts_for
from ._errors import AgentError
from ._runtime import ComponentRuntime, HealthReport

__all__ = ["ContainerEngine", "ContainerError", "ContainerRuntime", "NoContainerEngine",
           "app_image", "container_name"]

log = logging.getLogger("edgewise.agent")

STOP_TIMEOUT_S = 5  # SIGTERM, then SIGKILL: an app with --init stops at once
_CMD_TIMEOUT_S = 300.0


class ContainerError(AgentError):
    """The container engine failed a command (import, start, stop)."""


class NoContainerEngine(ContainerError):
    """Neither podman (with runc or crun) nor a reachable docker daemon is on this device."""


def container_name(app: str) -> str:
    return f"edgewise-{app}"


def app_image(manifest: AppManifest) -> str:
    """The name the device stores a release's image under (tags take no '+')."""
    return f"localhost/edgewise/{manifest.name}:{manifest.version.replace('+', '_')}"


class ContainerEngine:
    """One container engine, driven through its command line (podman's and docker's `run`,
    `rm`, `inspect`, `exec` and `images` take the same arguments for what is used here), and
    skopeo, which copies an OCI layout into the engine's store importing only the blobs it
    lacks."""

    def __init__(self, kind: str, argv: list[str], skopeo_dest: str,
                 env: dict[str, str] | None = None, skopeo_args: list[str] | None = None
                 ) -> None:
        self.kind = kind
        self._argv = argv
        self._skopeo_dest = skopeo_dest  # "containers-storage:[...]" or "docker-daemon:"
        self._skopeo_args = skopeo_args or []
        self._env = {**os.environ, **(env or {})}

    @classmethod
    def detect(cls, root: Path) -> ContainerEngine:
        """Podman with the agent's storage under `root`, else docker; `NoContainerEngine`."""
        root = Path(root)
        skopeo = shutil.which("skopeo")
        podman = shutil.which("podman")
        forced = os.environ.get("EDGEWISE_CONTAINER_ENGINE")  # podman | docker
        if skopeo is None:
            raise NoContainerEngine("skopeo is not installed (apt-get install skopeo podman "
                                    "runc): this device cannot import container images")
        if podman and forced in (None, "", "podman"):
            store = PodmanStore(root)
            return cls("podman", [podman, *store.podman_args()], store.skopeo_ref(""),
                       env=store.env())
        docker = shutil.which("docker")
        why = ""
        if docker and forced in (None, "", "docker"):
            probe = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"],
                                   capture_output=True, text=True, timeout=30)
            if probe.returncode == 0:
                # skopeo's docker-daemon transport ignores DOCKER_HOST: it is passed on.
                host = os.environ.get("DOCKER_HOST")
                return cls("docker", [docker], "docker-daemon:",
                           skopeo_args=["--dest-daemon-host", host] if host else [])
            why = f" (docker: {probe.stderr.strip()[-300:]})"
        raise NoContainerEngine("no container engine: install podman and runc (apt-get install "
                                f"podman runc skopeo), or run a docker daemon{why}")

    def _run(self, *args: str, check: bool = True, timeout_s: float = _CMD_TIMEOUT_S
             ) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run([*self._argv, *args], capture_output=True, text=True,
                                  env=self._env, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(f"{self.kind} {args[0]} timed out after {timeout_s:g} s"
                                 ) from exc
        if check and proc.returncode != 0:
            raise ContainerError(f"{self.kind} {' '.join(args[:2])} failed: "
                                 f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc

    def import_layout(self, layout: Path, ref: str, image: str) -> None:
        """Copy image `ref` of the OCI layout `layout` into the store as `image` (blobs the
        store already holds are not copied again)."""
        skopeo = shutil.which("skopeo") or "skopeo"
        proc = subprocess.run(
            [skopeo, "copy", "--quiet", *self._skopeo_args, f"oci:{layout}:{ref}",
             f"{self._skopeo_dest}{image}"],
            capture_output=True, text=True, env=self._env, timeout=_CMD_TIMEOUT_S)
        if proc.returncode != 0:
            raise ContainerError(f"importing {image} failed: {proc.stderr.strip()[-500:]}")

    def has_image(self, image: str) -> bool:
        return self._run("image", "inspect", "--format", "{{.Id}}", image,
                         check=False).returncode == 0

    def images(self, prefix: str) -> list[str]:
        out = self._run("images", "--format", "{{.Repository}}:{{.Tag}}").stdout
        return [line for line in out.split() if line.startswith(prefix)]

    def remove_image(self, image: str) -> None:
        self._run("rmi", image, check=False)

    def start(self, name: str, image: str, app: AppSpec,
              mounts: list[tuple[Path, str]] | None = None) -> None:
        """(Re)start container `name` from `image`, with `mounts` (host directory, path in the
        container) read-only: any container of that name goes first."""
        self.remove(name)
        env = [arg for key, value in sorted(app.env.items()) for arg in ("-e", f"{key}={value}")]
        volumes = [arg for host, inside in mounts or []
                   for arg in ("-v", f"{host}:{inside}:ro")]
        self._run("run", "-d", "--name", name, "--init", "--network", "host",
                  "--restart", app.restart, "--label", "edgewise.app=1", *env, *volumes, image)

    def remove(self, name: str) -> None:
        """Stop (SIGTERM, then SIGKILL after `STOP_TIMEOUT_S`) and remove; no error if absent."""
        if self.kind == "podman":
            self._run("rm", "-f", "-t", str(STOP_TIMEOUT_S), name, check=False)
        else:  # docker rm -f kills at once and has no timeout
            self._run("stop", "-t", str(STOP_TIMEOUT_S), name, check=False)
            self._run("rm", "-f", name, check=False)

    def status(self, name: str) -> tuple[str, str | None]:
        """(state, image) of container `name`: state is e.g. running, exited, or missing."""
        state, image, _restarts = self.inspect(name)
        return state, image

    def inspect(self, name: str) -> tuple[str, str | None, int]:
        """(state, image, restarts) of container `name`: `status`, and how many times its
        restart policy restarted it since it was created (0 if missing)."""
        proc = self._run("inspect", "--type", "container", "--format",
                         "{{.State.Status}} {{.RestartCount}} {{.Config.Image}}", name,
                         check=False)
        if proc.returncode != 0:
            return "missing", None, 0
        state, restarts, image = (proc.stdout.strip().split(" ", 2) + ["", ""])[:3]
        return state, image or None, int(restarts) if restarts.isdigit() else 0

    def logs(self, name: str, lines: int = 20) -> str:
        proc = self._run("logs", "--tail", str(lines), name, check=False)
        return (proc.stdout + proc.stderr).strip()[-1000:]

    def exec(self, name: str, command: tuple[str, ...], timeout_s: float) -> int:
        return self._run("exec", name, *command, check=False, timeout_s=timeout_s).returncode


class ContainerRuntime(ComponentRuntime):
    """The component runtime of app bundles. The engine is found at first use, so agents that
    never install an app never look for one."""

    def __init__(self, root: Path, *, config_root: Path | None = None) -> None:
        self.root = Path(root)
        self.config_root = config_root  # where config components' current files are
        self._engine: ContainerEngine | None = None

    @property
    def engine(self) -> ContainerEngine:
        if self._engine is None:
            self._engine = ContainerEngine.detect(self.root)
        return self._engine

    def available(self) -> str | None:
        """None if apps can run here, else why not."""
        try:
            self.engine  # noqa: B018 (detection is the point)
        except NoContainerEngine as exc:
            return str(exc)
        return None

    def stage(self, slot_dir: Path, manifest: AppManifest, *, keep: list[AppManifest]) -> None:
        engine = self.engine
        image = app_image(manifest)
        # Images of this app in neither slot are no longer reachable by a rollback.
        wanted = {image, *(app_image(m) for m in keep)}
        for old in engine.images(f"localhost/edgewise/{manifest.name}:"):
            if old not in wanted:
                engine.remove_image(old)
        engine.import_layout(slot_dir, manifest.app.ref, image)

    def activate(self, slot_dir: Path, manifest: AppManifest) -> None:
        engine = self.engine
        image = app_image(manifest)
        if not engine.has_image(image):  # the store was wiped: the slot still has the layout
            engine.import_layout(slot_dir, manifest.app.ref, image)
        mounts = (mounts_for(self.config_root, manifest.name)
                  if self.config_root is not None else [])
        engine.start(container_name(manifest.name), image, manifest.app, mounts)

    def ensure_running(self, slot_dir: Path, manifest: AppManifest) -> bool:
        """Start the committed app if its container is gone or stopped (after a reboot, or
        after its restart policy gave up); True if it had to."""
        state, image = self.engine.status(container_name(manifest.name))
        if state == "running" and image == app_image(manifest):
            return False
        self.activate(slot_dir, manifest)
        return True

    def stop(self, slot_dir: Path, manifest: AppManifest) -> None:
        self.engine.remove(container_name(manifest.name))

    def remove(self, manifest: AppManifest) -> None:
        """The app leaves the device: its container and every image of it in the store."""
        engine = self.engine
        engine.remove(container_name(manifest.name))
        for image in engine.images(f"localhost/edgewise/{manifest.name}:"):
            engine.remove_image(image)

    def health_check(self, slot_dir: Path, manifest: AppManifest) -> HealthReport:
        """Probe the running app as its manifest says (see `AppHealth`). An app that exited
        since `activate` created its container fails, even once its restart policy brought
        it back (a crash while on probation: kill -9 included)."""
        spec = manifest.app.health
        name = container_name(manifest.name)
        t0 = time.monotonic()
        latencies: list[float] = []
        reason = "no probe ran"
        for probe in range(1, spec.retries + 1):
            state, image, restarts = self.engine.inspect(name)
            if state != "running" or image != app_image(manifest) or restarts:
                logs = self.engine.logs(name)
                reason = (f"the container is {state}, not running {app_image(manifest)}"
                          if state != "running" or image != app_image(manifest) else
                          f"the app exited during its health check and was restarted "
                          f"{restarts} time(s) by its restart policy ({manifest.app.restart})")
                reason += f"; its last output: {logs}" if logs else ""
                break
            t_probe = time.monotonic()
            ok, reason = self._probe(name, manifest)
            latencies.append((time.monotonic() - t_probe) * 1000)
            if ok:
                return self._report(True, "ok", probe, t0, latencies)
            if probe < spec.retries:
                time.sleep(spec.interval_s)
        else:
            reason = f"{spec.retries} probes failed, the last: {reason}"
        return self._report(False, reason, len(latencies), t0, latencies)

    def _probe(self, name: str, manifest: AppManifest) -> tuple[bool, str]:
        spec = manifest.app.health
        if spec.http is not None:
            url = f"http://127.0.0.1:{spec.http.port}{spec.http.path}"
            try:
                response = httpx.get(url, timeout=spec.timeout_s)
            except httpx.HTTPError as exc:
                return False, f"GET {url}: {type(exc).__name__}: {exc}"
            if response.status_code != spec.http.expect_status:
                # The app's own words on why, if any: its answer on one line, shortened.
                said = " ".join(response.text.split())[:200]
                return False, (f"GET {url} answered {response.status_code}, expected "
                               f"{spec.http.expect_status}" + (f": {said}" if said else ""))
            return True, "ok"
        assert spec.command is not None
        try:
            code = self.engine.exec(name, spec.command, timeout_s=spec.timeout_s)
        except ContainerError as exc:
            return False, str(exc)
        return code == 0, f"{' '.join(spec.command)} exited {code}"

    def _report(self, passed: bool, reason: str, probes: int, t0: float,
                latencies: list[float]) -> HealthReport:
        p95 = sorted(latencies)[int(0.95 * (len(latencies) - 1))] if latencies else 0.0
        return HealthReport(passed=passed, max_abs_diff=0.0, top1_agreement=1.0 if passed else 0.0,
                            p95_latency_ms=round(p95, 3), reason=reason,
                            extra={"engine": self.engine.kind, "probes": probes,
                                   "seconds_to_healthy": round(time.monotonic() - t0, 3)
                                   if passed else None})

