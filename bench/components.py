"""Container apps as releases: what an app-only update sends, how long a swap leaves the app
unanswered, and how fast a broken version is replaced by the old one. A real server, a real
agent, real podman containers (runc) or, with --engine docker, a docker daemon of its own, one
run.

Prints JSON lines:
  {"bench": "app-update-bytes", "full_bytes", "sent_bytes", "fraction", "goal": 0.01, ...}
        v2 changes only the app layer; the base layers are the same blobs
  {"bench": "app-swap", "downtime_s", "goal_s": 2.0, "install_s", "activate_to_committed_s",
   ...} longest time the app did not answer GET / (polled every 10 ms) during v1 -> v2; the
        agent's time importing v2's image, and from stopping v1 to v2 committed (healthy)
  {"bench": "app-rollback", "detect_s", "recover_s", ...}
        v3 answers /health with 500: from its container starting to the agent's verdict
        (the manifest's health check: probes every interval_s, retries), and from the verdict
        to v2 answering again
  {"bench": "component-overhead", "cycle_ms", "start_ms", "state_json_bytes", ...}
        the agent with the app alone, then with a model beside it (two components): the
        median check cycle with nothing to update (one HTTPS check-in answers every
        component), the agent's start (it checks that every committed app runs), and the
        size of its state file

The image: FROM scratch, a base layer (busybox-static if installed, plus --filler-mb of
incompressible bytes standing in for a language runtime: a Debian python3-minimal base is
43.3 MB compressed), the static C test server, and an app layer (one small file).

    python bench/components.py [--filler-mb 40] [--engine podman|docker]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests._apps import PrivateDockerd, app_section, reset_store, server_binary  # noqa: E402
from tests.conftest import make_tiny_bundle  # noqa: E402

from edgewise.agent import Agent, AgentConfig, StateDir, enroll  # noqa: E402
from edgewise.artifacts import build_app  # noqa: E402
from edgewise.server.client import OperatorClient, publish_bundle  # noqa: E402
from edgewise.sim import AgentProcess, ServerProcess, free_port  # noqa: E402
from edgewise.trust import init_certs, init_keys  # noqa: E402


def emit(line: dict) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def context(work: Path, version_text: str, binary: Path, filler_mb: int) -> Path:
    ctx = work / f"ctx-{version_text.split()[0]}"
    ctx.mkdir(parents=True)
    base = ctx / "base"
    base.mkdir()
    busybox = shutil.which("busybox")
    lines = ["FROM scratch"]
    if busybox:
        shutil.copy2(busybox, base / "busybox")
    filler = work / "filler.bin"
    if not filler.exists():
        filler.write_bytes(os.urandom(filler_mb << 20))
    os.link(filler, base / "filler.bin")
    lines.append("COPY base/ /base/")
    shutil.copy2(binary, ctx / "server")
    for path in (base / "filler.bin", ctx / "server", *(base.iterdir())):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    (ctx / "version.txt").write_text(version_text + "\n")
    lines += ["COPY server /server", "COPY version.txt /version.txt", 'ENTRYPOINT ["/server"]']
    (ctx / "Containerfile").write_text("\n".join(lines) + "\n")
    return ctx


class Poller(threading.Thread):
    """GET / every 10 ms; remembers (time, body or None) of each answer."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.samples, self.stop = port, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=1) as http:
            while not self.stop.is_set():
                try:
                    body = http.get(f"http://127.0.0.1:{self.port}/").text.strip()
                except httpx.HTTPError:
                    body = None
                self.samples.append((time.time(), body))
                time.sleep(0.01)

    def longest_gap(self) -> float:
        gap, start = 0.0, None
        last_ok = None
        for t, body in self.samples:
            if body is None and start is None:
                start = last_ok if last_ok is not None else t
            elif body is not None:
                if start is not None:
                    gap, start = max(gap, t - start), None
                last_ok = t
        return gap

    def first(self, body: str, after: float) -> float | None:
        return next((t for t, b in self.samples if t > after and b == body), None)


def history_ts(state: Path, state_name: str, target: str) -> float:
    rec = StateDir(state).load_record()
    for entry in reversed(rec.history):
        if entry["state"] == state_name:
            return datetime.fromisoformat(entry["ts"]).timestamp()
    raise SystemExit(f"no {state_name} in the history while updating to {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filler-mb", type=int, default=40)
    parser.add_argument("--engine", choices=("podman", "docker"), default="podman",
                        help="what the agent runs the app with (images are built with podman)")
    args = parser.parse_args()
    for tool in ("podman", "skopeo", "gcc", *(("dockerd",) if args.engine == "docker" else ())):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (make system-deps)")
    work = Path(tempfile.mkdtemp(prefix="edgewise-bench-components-"))
    dockerd = PrivateDockerd(work / "dockerd").start() if args.engine == "docker" else None
    if dockerd is not None:  # the agent processes inherit both
        os.environ["DOCKER_HOST"] = dockerd.host
    os.environ["EDGEWISE_CONTAINER_ENGINE"] = args.engine
    keys = init_keys(work / "keys")
    certs = init_certs(work / "certs", hostnames=["127.0.0.1", "localhost"])
    token = secrets.token_urlsafe(24)
    server = ServerProcess(data_dir=work / "server", root_path=keys.root_json,
                           online_key_path=keys.online_key, admin_token=token,
                           tls_cert=certs.server_cert, tls_key=certs.server_key,
                           ca_path=certs.ca_cert, log_path=work / "server.log").start()
    state, store = work / "device", work / "build-store"
    port = free_port()
    poller = Poller(port)
    try:
        client = OperatorClient(server.url, token=token, verify=str(certs.ca_cert))
        enroll(state, server_url=server.url, token=client.create_enrollment_token(),
               root_path=keys.root_json, name="bench", hardware="bench",
               ca_path=certs.ca_cert)
        binary = server_binary(work / "bin")
        section = app_section(port)
        health = section["health"]

        def ship(version: str, text: str) -> tuple[dict, float]:
            ctx = context(work, text, binary, args.filler_mb)
            build_app(ctx, work / f"app-{version}", name="bench-app", version=version,
                      app=section, storage=store)
            release = publish_bundle(client, work / f"app-{version}", root_path=keys.root_json,
                                     targets_key_path=keys.targets_key)
            client.assign(release["id"])
            t0 = time.time()
            code = AgentProcess(state_dir=state, once=True,
                                log_path=work / "agent.log").start().wait(timeout_s=600)
            if code != 0:
                sys.exit(f"the agent exited {code}; see {work / 'agent.log'}")
            rec = StateDir(state).load_record().components["bench-app"]  # the app's record
            return {"state": rec.state.value, "download": rec.last_download,
                    "health": rec.last_health}, t0

        first, _ = ship("1.0.0", "v1")
        poller.start()
        second, _ = ship("2.0.0", "v2")
        stats = second["download"]
        emit({"bench": "app-update-bytes", "full_bytes": stats["full_bytes"],
              "sent_bytes": stats["sent_bytes"],
              "fraction": round(stats["sent_bytes"] / stats["full_bytes"], 5), "goal": 0.01,
              "first_install_sent_bytes": first["download"]["sent_bytes"],
              "filler_mb": args.filler_mb, "busybox": bool(shutil.which("busybox")),
              "state": second["state"]})
        # From the agent's history (each state's entry time): the image import, then stop
        # old + start new + healthy.
        installing, activating, committed = (history_ts(state, name, "2.0.0") for name in (
            "installing", "activating", "committed"))
        emit({"bench": "app-swap", "downtime_s": round(poller.longest_gap(), 3),
              "goal_s": 2.0, "engine": second["health"].get("engine"),
              "seconds_to_healthy": second["health"].get("seconds_to_healthy"),
              "install_s": round(activating - installing, 3),
              "activate_to_committed_s": round(committed - activating, 3)})

        third, t_start = ship("3.0.0", "broken v3")
        activated = history_ts(state, "health-checking", "3.0.0")
        verdict = history_ts(state, "rolling-back", "3.0.0")
        healthy = poller.first("v2", after=verdict)
        emit({"bench": "app-rollback", "state": third["state"],
              "detect_s": round(verdict - activated, 3),
              "recover_s": round(healthy - verdict, 3) if healthy else None,
              "health_check": {k: health[k] for k in ("timeout_s", "interval_s", "retries")},
              "update_to_v2_again_s": round(healthy - t_start, 3) if healthy else None})

        def overhead(cycles: int = 20) -> dict:
            t0 = time.perf_counter()
            agent = Agent(AgentConfig(state_dir=state))
            try:
                agent.run_cycle()  # the first also checks that each committed app runs
                start_ms = (time.perf_counter() - t0) * 1000
                times = []
                for _ in range(cycles):
                    t1 = time.perf_counter()
                    agent.run_cycle()
                    times.append((time.perf_counter() - t1) * 1000)
            finally:
                agent.close()
            return {"cycle_ms": round(statistics.median(times), 2),
                    "start_ms": round(start_ms, 1),
                    "state_json_bytes": (state / "state.json").stat().st_size}

        one = overhead()
        model = publish_bundle(client, make_tiny_bundle(work / "tiny-1"), root_path=keys.root_json,
                               targets_key_path=keys.targets_key)
        client.assign(model["id"])
        if AgentProcess(state_dir=state, once=True, log_path=work / "agent.log").start().wait(
                timeout_s=600) != 0:
            sys.exit(f"the agent exited with an error; see {work / 'agent.log'}")
        rec = StateDir(state).load_record()
        two = overhead()
        emit({"bench": "component-overhead", "one_component": one, "two_components": two,
              "per_component_cycle_ms": round(two["cycle_ms"] - one["cycle_ms"], 2),
              "committed": [r.installed.label for r in rec.lanes() if r.installed]})
    finally:
        poller.stop.set()
        server.stop()
        if dockerd is not None:
            dockerd.stop()
        reset_store(state / "containers")
        reset_store(store)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
